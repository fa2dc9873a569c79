/* Micro-benchmark run inside a container by `cargo xtask bench`: N iterations of one
 * operation, timed with CLOCK_MONOTONIC; prints "<ns per op>" on stdout. Any failed
 * iteration is fatal (exit 1, errno on stderr): a benchmark of denied operations would
 * measure the wrong thing.
 *
 *   bench_ops open-distinct DIR N   open+read+close DIR/f0 .. DIR/f<N-1> (each once)
 *   bench_ops open-same FILE N      open+read+close FILE N times (after one warm-up)
 *   bench_ops syscall N             getppid() N times: the price every syscall of the node pays
 *                                   for the agent's syscall hooks
 *   bench_ops exec PATH N           fork + execve(PATH) + waitpid, N times; prints
 *                                   "<ns per op> <execs that failed with EPERM>"
 *   bench_ops connect IPV4 PORT N   socket + TCP connect + close (RST), N times, to a listener
 *                                   this program opens on IPV4:PORT (backlog 4096) and a forked
 *                                   child accepts from: a listener elsewhere that falls behind
 *                                   fills its accept queue, and dropped SYNs cost a 1 s retry
 *   bench_ops probe-open FILE       one open; prints "ok", "EPERM" or the error (sanity checks)
 *   bench_ops probe-connect IPV4 PORT  one TCP connect; prints "EPERM" or "allowed" (connected
 *                                   or refused: the policy let it through)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <sys/syscall.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what, const char *arg) {
    fprintf(stderr, "%s %s: %s\n", what, arg, strerror(errno));
    exit(1);
}

static void open_read_close(const char *path) {
    char buf[64];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open", path);
    if (read(fd, buf, sizeof buf) < 0) die("read", path);
    close(fd);
}

static long long bench_open_distinct(const char *dir, long n) {
    char path[4096];
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%ld", dir, i);
        open_read_close(path);
    }
    return now_ns() - t0;
}

static long long bench_syscall(long n) {
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    return now_ns() - t0;
}

static long long bench_open_same(const char *file, long n) {
    open_read_close(file);
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) open_read_close(file);
    return now_ns() - t0;
}

/* An allowed exec that fails with EPERM anyway is counted, not fatal: it is a finding the
 * caller reports (see docs/benchmarks.md). */
static long denied_execs;

static long long bench_exec(const char *path, long n) {
    char *const argv[] = {(char *)path, NULL};
    char *const envp[] = {NULL};
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) die("fork", path);
        if (pid == 0) {
            execve(path, argv, envp);
            _exit(errno == EPERM ? 126 : 127);
        }
        int st;
        if (waitpid(pid, &st, 0) < 0) die("waitpid", path);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 126) {
            denied_execs++;
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "exec %s: status 0x%x\n", path, st);
            exit(1);
        }
    }
    return now_ns() - t0;
}

static long long bench_connect(const char *ip, int port, long n) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) die("address", ip);
    int one = 1;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket", ip);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind", ip);
    if (listen(lfd, 4096) < 0) die("listen", ip);
    pid_t acceptor = fork();
    if (acceptor < 0) die("fork", ip);
    if (acceptor == 0) {
        for (;;) {
            int c = accept(lfd, NULL, NULL);
            if (c >= 0) close(c);
        }
    }
    close(lfd);
    /* Linger 0: close sends RST, so no TIME_WAIT piles up across iterations. */
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) die("socket", ip);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect", ip);
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(fd);
    }
    long long total = now_ns() - t0;
    kill(acceptor, SIGKILL);
    waitpid(acceptor, NULL, 0);
    return total;
}

static int probe_result(int rc) {
    puts(rc >= 0 ? "ok" : errno == EPERM ? "EPERM" : strerror(errno));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "probe-open") == 0)
        return probe_result(open(argv[2], O_RDONLY));
    if (argc == 4 && strcmp(argv[1], "probe-connect") == 0) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) die("address", argv[2]);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket", argv[2]);
        int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
        puts(rc < 0 && errno == EPERM ? "EPERM" : "allowed");
        return 0;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: see the comment at the top of bench_ops.c\n");
        return 2;
    }
    const char *op = argv[1];
    long n = atol(argv[argc - 1]);
    if (n <= 0) {
        fprintf(stderr, "bad iteration count %s\n", argv[argc - 1]);
        return 2;
    }
    long long total;
    if (strcmp(op, "syscall") == 0 && argc == 3)
        total = bench_syscall(n);
    else if (strcmp(op, "open-distinct") == 0 && argc == 4)
        total = bench_open_distinct(argv[2], n);
    else if (strcmp(op, "open-same") == 0 && argc == 4)
        total = bench_open_same(argv[2], n);
    else if (strcmp(op, "exec") == 0 && argc == 4)
        total = bench_exec(argv[2], n);
    else if (strcmp(op, "connect") == 0 && argc == 5)
        total = bench_connect(argv[2], atoi(argv[3]), n);
    else {
        fprintf(stderr, "unknown operation %s\n", op);
        return 2;
    }
    if (strcmp(op, "exec") == 0)
        printf("%lld %ld\n", total / n, denied_execs);
    else
        printf("%lld\n", total / n);
    return 0;
}
