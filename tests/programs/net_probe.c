/* Egress probe for tests: net_probe MODE ADDR PORT [WAIT_FOR_PATH]
 * MODE: tcp | udp-sendto | udp-connect | tfo (sendto MSG_FASTOPEN: connect and data in one
 * call) | udp-unspec (sendto with sa_family AF_UNSPEC, which IPv4 UDP delivers) | raw (a UDP
 * datagram through a SOCK_RAW socket) | ping (an ICMP "ping" socket) | packet (an AF_PACKET
 * socket; ADDR and PORT unused).
 * Prints "ok" or the errno name and exits with 0 or the errno. With WAIT_FOR_PATH it first
 * polls (stat only: no open, no exec) until that path exists, for up to 60 s. */
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <netinet/in.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <unistd.h>

static int report(int e) {
    printf("%s\n", e == EPERM ? "EPERM" : e == EACCES ? "EACCES" : e == ECONNREFUSED ? "ECONNREFUSED" : strerror(e));
    return e;
}

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
    const char *mode = argv[1];
    int tcp = strcmp(mode, "tcp") == 0, tfo = strcmp(mode, "tfo") == 0;
    int raw = strcmp(mode, "raw") == 0, ping = strcmp(mode, "ping") == 0;
    int fd;
    if (strcmp(mode, "packet") == 0)
        fd = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IP));
    else if (raw)
        fd = socket(family, SOCK_RAW, IPPROTO_UDP);
    else if (ping)
        fd = socket(family, SOCK_DGRAM, family == AF_INET ? IPPROTO_ICMP : IPPROTO_ICMPV6);
    else
        fd = socket(family, tcp || tfo ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (fd < 0) return report(errno);
    int r;
    if (strcmp(mode, "packet") == 0) {
        r = 0;
    } else if (raw) {
        /* UDP header + 1 byte; the kernel writes the IP header. IPv6 needs the checksum. */
        unsigned char pkt[9] = {0x30, 0x39, (unsigned char)(port >> 8), (unsigned char)port, 0, 9, 0, 0, 'x'};
        if (family == AF_INET6) { int off = 6; setsockopt(fd, IPPROTO_IPV6, IPV6_CHECKSUM, &off, sizeof off); }
        s4->sin_port = 0; s6->sin6_port = 0;
        r = sendto(fd, pkt, sizeof pkt, 0, (struct sockaddr *)&ss, len) == (ssize_t)sizeof pkt ? 0 : -1;
    } else if (ping) {
        unsigned char echo[8] = {family == AF_INET ? 8 : 128, 0, 0, 0, 0, 0, 0, 1};
        r = sendto(fd, echo, sizeof echo, 0, (struct sockaddr *)&ss, len) == 8 ? 0 : -1;
    } else if (tfo) {
        r = sendto(fd, "x", 1, MSG_FASTOPEN, (struct sockaddr *)&ss, len) == 1 ? 0 : -1;
    } else if (strcmp(mode, "udp-unspec") == 0) {
        ss.ss_family = AF_UNSPEC;
        r = sendto(fd, "x", 1, 0, (struct sockaddr *)&ss, len) == 1 ? 0 : -1;
    } else if (tcp || strcmp(mode, "udp-connect") == 0) {
        r = connect(fd, (struct sockaddr *)&ss, len);
        if (r == 0 && !tcp) r = send(fd, "x", 1, 0) == 1 ? 0 : -1;
    } else {
        r = sendto(fd, "x", 1, 0, (struct sockaddr *)&ss, len) == 1 ? 0 : -1;
    }
    if (r != 0) return report(errno);
    printf("ok\n");
    return 0;
}
