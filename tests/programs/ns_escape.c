/* Namespace escape attempts for tests: ns_escape clone|clone3|unshare|ia32|chroot MARKER [WAIT]
 * (ia32: unshare through the 32-bit syscall ABI, `int 0x80`, which 64-bit code may use too)
 * With WAIT it first prints "waiting" and polls (stat only) until that path exists (60 s).
 * Tries to enter a user+mount namespace (or a new root) of its own, the way around path-based
 * rules, and creates MARKER from the new context when it got there (the forbidden effect).
 * Prints "escaped" then; exits 0 on success, the errno when the kernel refused.
 *
 * ns_escape clone3-race MARKER WORKERS: the clone3 flag race. Each worker process has a thread
 * flipping clone_args.flags between 0 and CLONE_NEWUSER|CLONE_NEWNS while it calls clone3 in a
 * loop; a child that finds itself in a new user namespace (uid 65534, no mapping) creates
 * MARKER. Prints "escaped" when one did, else "workers killed: N". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <pthread.h>
#include <unistd.h>

static int mark(const char *path) {
    int fd = open(path, O_CREAT | O_WRONLY, 0644);
    if (fd < 0) return errno;
    close(fd);
    printf("escaped\n");
    fflush(stdout);
    return 0;
}

static int mark(const char *path);
static struct clone_args race_args;
static void *flip(void *arg) {
    (void)arg;
    for (;;) {
        __atomic_store_n(&race_args.flags, 0ULL, __ATOMIC_RELAXED);
        __atomic_store_n(&race_args.flags, (unsigned long long)(CLONE_NEWUSER | CLONE_NEWNS), __ATOMIC_RELAXED);
    }
    return NULL;
}

static void race_worker(const char *marker) {
    pthread_t t;
    race_args.exit_signal = SIGCHLD;
    pthread_create(&t, NULL, flip, NULL);
    for (int i = 0; i < 100000; i++) {
        long pid = syscall(SYS_clone3, &race_args, sizeof race_args);
        if (pid == 0) {
            if (getuid() == 65534) _exit(mark(marker) == 0 ? 42 : 1);
            _exit(0);
        }
        if (pid > 0) {
            int st = 0;
            waitpid((pid_t)pid, &st, __WALL);
            if (WIFEXITED(st) && WEXITSTATUS(st) == 42) _exit(42);
        }
    }
    _exit(0);
}

static int clone3_race(const char *marker, int workers) {
    int killed = 0;
    for (int w = 0; w < workers; w++) {
        pid_t p = fork();
        if (p == 0) race_worker(marker);
        int st = 0;
        waitpid(p, &st, 0);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 42) return 0; /* "escaped" already printed */
        if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) killed++;
    }
    printf("workers killed: %d\n", killed);
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "clone3-race")) return clone3_race(argv[2], atoi(argv[3]));
    if (argc != 3 && argc != 4) return 2;
    if (argc == 4) {
        struct stat st;
        printf("waiting\n");
        fflush(stdout);
        for (int i = 0; i < 1200 && stat(argv[3], &st) != 0; i++) usleep(50000);
    }
    const char *how = argv[1], *marker = argv[2];
    unsigned long flags = CLONE_NEWUSER | CLONE_NEWNS;
    if (!strcmp(how, "unshare")) {
        if (unshare(flags) != 0) { printf("%s\n", strerror(errno)); return errno; }
        return mark(marker);
    }
    if (!strcmp(how, "ia32")) {
        long r;
        __asm__ volatile("int $0x80" : "=a"(r) : "a"(310L) /* ia32 unshare */, "b"((long)flags)
                         : "memory");
        if (r != 0) { printf("%s\n", strerror((int)-r)); return (int)-r; }
        return mark(marker);
    }
    if (!strcmp(how, "chroot")) {
        if (chroot("/tmp") != 0) { printf("%s\n", strerror(errno)); return errno; }
        /* The marker path is resolved in the new root. */
        return mark(marker);
    }
    long pid;
    if (!strcmp(how, "clone")) {
        pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    } else if (!strcmp(how, "clone3")) {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = flags;
        args.exit_signal = SIGCHLD;
        pid = syscall(SYS_clone3, &args, sizeof args);
    } else {
        return 2;
    }
    if (pid < 0) { printf("%s\n", strerror(errno)); return errno; }
    if (pid == 0) _exit(mark(marker));
    int st = 0;
    waitpid((pid_t)pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
