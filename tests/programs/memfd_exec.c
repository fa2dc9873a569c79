/* Fileless exec for tests: copy an executable into a memfd and fexecve it.
 * Usage: memfd_exec SOURCE [ARGS...]. Exit 97 when the fexecve itself fails. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int src = open(argv[1], O_RDONLY);
    if (src < 0) { perror("open"); return 3; }
    int mfd = memfd_create("palisade-fileless", MFD_CLOEXEC);
    if (mfd < 0) { perror("memfd_create"); return 4; }
    char buf[65536];
    ssize_t n;
    while ((n = read(src, buf, sizeof buf)) > 0)
        if (write(mfd, buf, n) != n) { perror("write"); return 5; }
    extern char **environ;
    fexecve(mfd, argv + 1, environ);
    perror("fexecve");
    return 97;
}
