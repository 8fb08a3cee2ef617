/*
 * LD_PRELOAD shim used by benches/ingest.py: rewrites a bind() to the IPv4 or
 * IPv6 wildcard address (0.0.0.0 / ::) into a bind to loopback (127.0.0.1 /
 * ::1), keeping the port. Orthanc (and storescp) cannot choose their listen
 * address and would otherwise listen on every interface during a benchmark.
 *
 * Every wildcard bind in the process is rewritten, including a client socket
 * bound to port 0 before connect(): fine for the benchmark, where the peers
 * only talk to loopback.
 *
 * Built by ingest.py: gcc -shared -fPIC -O2 -o libbind_loopback.so bind_loopback.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind(void)
{
    static bind_fn fn;
    if (!fn)
        fn = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return fn;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    bind_fn next = real_bind();
    if (!next) {
        errno = ENOSYS;
        return -1;
    }
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in;
        memcpy(&in, addr, sizeof in);
        if (in.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return next(fd, (const struct sockaddr *)&in, sizeof in);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) {
            in6.sin6_addr = in6addr_loopback;
            return next(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return next(fd, addr, len);
}
