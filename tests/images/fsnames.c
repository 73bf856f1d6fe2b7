/* fsnames: the file-name calls of one glibc generation, for the F-mode tests of each
 * Debian release (tests/test_releases.py).
 *
 *     fsnames FILE LINK [PROGRAM ARG...]
 *
 * Compiled inside each release's chroot by tests/images/build_release_images.sh, so that
 * its headers choose the names the binary imports: before glibc 2.33 stat(), lstat() and
 * fstatat() are inline calls of __xstat, __lxstat and __fxstatat (bullseye's 2.31), from
 * 2.33 on they are the symbols stat, lstat and fstatat (bookworm, trixie). libfakechroot
 * must wrap whichever the program calls. One line per call, "NAME VALUE":
 *     stat/lstat/fstatat/stat64/statx/open/openat/fstatat-dirfd INODE   of FILE (-1: failed)
 *     access/faccessat/faccessat-eaccess 0|-1   FILE readable (AT_EACCESS: faccessat2)
 *     readlink TARGET, realpath PATH   of LINK
 *     getcwd PATH
 * then, if PROGRAM is given, execve(PROGRAM, [PROGRAM, ARG...]) (its exit status is the
 * exit status), else exit 0.
 */
#define _GNU_SOURCE
#define _LARGEFILE64_SOURCE
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* "NAME INODE" when rc is 0 (the call succeeded), else "NAME -1" */
static void ino(const char *name, int rc, unsigned long long value)
{
    if (rc == 0)
        printf("%s %llu\n", name, value);
    else
        printf("%s -1\n", name);
}

static void ino_of_fd(const char *name, int fd)
{
    struct stat st;
    int rc = fd < 0 ? -1 : fstat(fd, &st);

    ino(name, rc, rc == 0 ? (unsigned long long)st.st_ino : 0);
    if (fd >= 0)
        close(fd);
}

int main(int argc, char **argv)
{
    struct stat st;
    struct stat64 st64;
    struct statx stx;
    char buf[PATH_MAX], copy[PATH_MAX];
    const char *file, *link;
    ssize_t n;
    int dirfd, rc;

    if (argc < 3) {
        fprintf(stderr, "usage: fsnames FILE LINK [PROGRAM ARG...]\n");
        return 2;
    }
    file = argv[1];
    link = argv[2];
    rc = stat(file, &st);
    ino("stat", rc, st.st_ino);
    rc = lstat(file, &st);
    ino("lstat", rc, st.st_ino);
    rc = fstatat(AT_FDCWD, file, &st, 0);
    ino("fstatat", rc, st.st_ino);
    rc = stat64(file, &st64);
    ino("stat64", rc, st64.st_ino);
    rc = statx(AT_FDCWD, file, 0, STATX_INO, &stx);
    ino("statx", rc, stx.stx_ino);
    ino_of_fd("open", open(file, O_RDONLY));
    ino_of_fd("openat", openat(AT_FDCWD, file, O_RDONLY));
    /* FILE's directory as a directory fd, FILE's last component under it */
    strncpy(copy, file, sizeof copy - 1);
    copy[sizeof copy - 1] = '\0';
    dirfd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    strncpy(copy, file, sizeof copy - 1);
    rc = dirfd < 0 ? -1 : fstatat(dirfd, basename(copy), &st, 0);
    ino("fstatat-dirfd", rc, st.st_ino);
    if (dirfd >= 0)
        close(dirfd);
    printf("access %d\n", access(file, R_OK));
    printf("faccessat %d\n", faccessat(AT_FDCWD, file, R_OK, 0));
    printf("faccessat-eaccess %d\n", faccessat(AT_FDCWD, file, R_OK, AT_EACCESS));
    n = readlink(link, buf, sizeof buf - 1);
    buf[n < 0 ? 0 : n] = '\0';
    printf("readlink %s\n", n < 0 ? "-1" : buf);
    printf("realpath %s\n", realpath(link, buf) ? buf : "-1");
    printf("getcwd %s\n", getcwd(buf, sizeof buf) ? buf : "-1");
    fflush(stdout);
    if (argc > 3) {
        extern char **environ;
        execve(argv[3], argv + 3, environ);
        perror("fsnames: execve");
        return 127;
    }
    return 0;
}
