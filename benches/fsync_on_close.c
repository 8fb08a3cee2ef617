/*
 * LD_PRELOAD shim used by benches/ingest.py for the "storescp-sync" peer:
 * DCMTK storescp made durable the way an archive must be. Before a file
 * opened for writing is closed (fclose or close), its data is fdatasync'ed
 * and its directory fsync'ed, so storescp acknowledges a C-STORE only once
 * the received file and its directory entry are on disk (storescp writes
 * the file before it sends the C-STORE-RSP). Nothing else changes: no
 * hashing, no index. It tells what durability alone costs on this disk,
 * beside plain storescp, which acknowledges from the page cache.
 *
 * Built by ingest.py: gcc -shared -fPIC -O2 -o libfsync_on_close.so fsync_on_close.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void make_durable(int fd)
{
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY)
        return;
    fdatasync(fd);
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return;
    path[n] = '\0';
    int dir = open(dirname(path), O_RDONLY | O_DIRECTORY);
    if (dir >= 0) {
        fsync(dir);
        syscall(SYS_close, dir); /* not through close() below */
    }
}

int fclose(FILE *f)
{
    static int (*next)(FILE *);
    if (!next)
        next = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (f) {
        fflush(f);
        make_durable(fileno(f));
    }
    return next(f);
}

int close(int fd)
{
    static int (*next)(int);
    if (!next)
        next = (int (*)(int))dlsym(RTLD_NEXT, "close");
    make_durable(fd);
    return next(fd);
}
