/* Egress probe for tests: net_probe tcp|udp-sendto|udp-connect ADDR PORT [WAIT_FOR_PATH]
 * Prints "ok" or the errno name and exits with 0 or the errno. With WAIT_FOR_PATH it first
 * polls (stat only: no open, no exec) until that path exists, for up to 60 s. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) return 2;
    if (argc == 5) {
        struct stat st;
        printf("waiting\n");
        fflush(stdout);
        for (int i = 0; i < 1200 && stat(argv[4], &st) != 0; i++) usleep(50000);
    }
    struct sockaddr_storage ss; memset(&ss, 0, sizeof ss);
    socklen_t len;
    int family;
    unsigned short port = (unsigned short)atoi(argv[3]);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, argv[2], &s4->sin_addr) == 1) {
        family = AF_INET; s4->sin_family = AF_INET; s4->sin_port = htons(port); len = sizeof *s4;
    } else if (inet_pton(AF_INET6, argv[2], &s6->sin6_addr) == 1) {
        family = AF_INET6; s6->sin6_family = AF_INET6; s6->sin6_port = htons(port); len = sizeof *s6;
    } else return 2;
    int tcp = strcmp(argv[1], "tcp") == 0;
    int fd = socket(family, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 3; }
    int r;
    if (tcp || strcmp(argv[1], "udp-connect") == 0) {
        r = connect(fd, (struct sockaddr *)&ss, len);
        if (r == 0 && !tcp) r = send(fd, "x", 1, 0) == 1 ? 0 : -1;
    } else {
        r = sendto(fd, "x", 1, 0, (struct sockaddr *)&ss, len) == 1 ? 0 : -1;
    }
    if (r != 0) {
        int e = errno;
        printf("%s\n", e == EPERM ? "EPERM" : e == EACCES ? "EACCES" : e == ECONNREFUSED ? "ECONNREFUSED" : strerror(e));
        return e;
    }
    printf("ok\n");
    return 0;
}
