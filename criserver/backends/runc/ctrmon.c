/*
 * ctrmon: the per-container monitor of criserver's runc backend (docs/design/runc-backend.md,
 * 1.5, 2 and 3.2). It is the parent of the container's init, holds its stdio, writes its CRI log
 * and records its exit, so that none of this depends on the daemon being alive. Everything else
 * (spec, rootfs, cgroups, runc start/kill/delete) stays in Python.
 *
 *   ctrmon --version                  prints "ctrmon 1" (the protocol below)
 *   ctrmon create --runc PATH --root DIR --bundle DIR --id ID --log PATH
 *                 [--tty] [--stdin] [--stdin-once] [--kill-all] [--runc-arg ARG]...
 *                 [--sync-fd N]       (default 3: the write end of the daemon's sync pipe)
 *   ctrmon exec --runc PATH --root DIR --bundle DIR --id ID --process FILE --pid-file FILE
 *               --console NAME [--runc-log FILE] [--resize-fd N] [--sync-fd N]
 *               [--runc-arg ARG]...
 *   ctrmon pause                      PID 1 of a host pod's PID namespace (see pause_forever)
 *
 * create:
 *  1. forks; the parent exits 0 at once. The child setsid()s, becomes a child subreaper, sets
 *     oom_score_adj -999 (best-effort), ignores SIGPIPE/SIGHUP/SIGTERM/SIGINT, sends its own
 *     stdout/stderr to BUNDLE/ctrmon.log and writes its pid to BUNDLE/ctrmon.pid (temp + rename).
 *  2. makes the container's stdio: pipes for stdout/stderr (stdin a pipe with --stdin, else
 *     /dev/null), or with --tty a console socket BUNDLE/console.sock that receives the pty master
 *     from runc; opens the log and listens on BUNDLE/ctl (SOCK_SEQPACKET, mode 0600).
 *  3. runs RUNC --root ROOT --log BUNDLE/runc.log --log-format json [ARG...] create --bundle
 *     BUNDLE --pid-file BUNDLE/init.pid [--console-socket S] ID as its child. The sync fd gets one
 *     JSON line: {"pid":N} or {"error":"runc create failed","status":N} (runc's own message is
 *     in runc.log) or {"error":"<what failed>"}; on error ctrmon exits 1.
 *  4. copies output to the log (the format of criserver/runtime/container_log.py) and to attach
 *     clients, and serves BUNDLE/ctl, one datagram per message:
 *       "reopen" -> "ok" | "error <text>"    (kubelet renamed the log: open the path anew)
 *       "resize <rows> <cols>" -> "ok"        "close-stdin" -> "ok"
 *       "attach <0|1>" -> "ok", then frames: out [1|2][data]; in [0][stdin], [3] (client done
 *       with stdin: closes the container's with --stdin-once), [4]<rows> <cols>.
 *  5. when the init exits (other re-parented processes are reaped and ignored): with --kill-all
 *     runs RUNC --root ROOT [ARG...] kill --all ID KILL, drains the output to EOF (giving up after
 *     2 s without progress), ends partial lines as P records, closes the log, then writes
 *     BUNDLE/exit (temp + rename): {"exit_code":C,"signal":S,"finished_at":NS}, C = 128+S when
 *     killed by signal S, NS the CLOCK_REALTIME ns of the reap. Exits 0.
 *
 * exec (a tty exec, design 3.1: runc takes a console socket only when it detaches). An ordinary
 * child of the daemon, which reaps it; FILE paths are absolute or relative to the bundle.
 *  1. chdirs to BUNDLE, becomes a child subreaper (the detached process is re-parented to it
 *     when runc exits), asks for SIGTERM when the daemon dies, listens on BUNDLE/NAME.
 *  2. runs RUNC --root ROOT [--log FILE --log-format json] [ARG...] exec --detach --tty
 *     --console-socket BUNDLE/NAME --pid-file FILE --process FILE ID (FILE's "terminal" must be
 *     true; runc's output goes to our stderr) and receives the pty master. The sync fd gets
 *     {"pid":N}, or {"error":"runc exec failed","status":N} or {"error":"<what failed>"} and
 *     ctrmon exits 1.
 *  3. relays the master to its stdout and its stdin to the master (stdin's EOF becomes an EOT,
 *     ^D), sets the size from "<rows> <cols>\n" lines on the resize fd, and on SIGTERM, SIGINT
 *     or SIGHUP kills the process (SIGKILL: it is our unreaped child, the pid is its own).
 *  4. once the process exited, drains the pty (to EIO, giving up after 2 s without progress)
 *     and exits with its code: C, or 128+S when killed by signal S.
 *
 * One thread, poll(), fixed buffers: nothing on the output path allocates, so memory pressure
 * cannot cost a log line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL 1
#define MAX_LINE 16384          /* containerd's max_container_log_line_size, as container_log.py */
#define READ_SIZE 65536
#define FRAME_MAX 32768         /* attach frame payload: well under a unix socket's sndbuf */
#define FMT_SIZE (256 * 1024)
#define RECORD_MAX (MAX_LINE + 64)
#define MAX_CONNS 32
#define MAX_RUNC_ARGS 16
#define MAX_EARLY 64
#define PIPE_SIZE (1024 * 1024)
#define DRAIN_MS 2000

enum { CONN_FREE, CONN_CTL, CONN_ATTACH };
enum { OUT_STDOUT, OUT_STDERR };

struct partial {
    char data[MAX_LINE];
    size_t len;
    long long time_ns;
};

struct conn {
    int fd;
    int kind;
    int wants_stdin;
};

static struct {
    const char *runc, *root, *bundle, *id, *log_path;
    const char *runc_args[MAX_RUNC_ARGS];
    int n_runc_args;
    int tty, stdin_, stdin_once, kill_all;
    int sync_fd;
} opt = {.sync_fd = 3};

static int log_fd = -1;
static int out_fd[2] = {-1, -1};     /* read ends (tty: out_fd[0] is the pty master) */
static int stdin_fd = -1;            /* our end of the container's stdin, -1 when none/closed */
static int stdin_close_pending;
static int stdin_once_conn = -1;     /* index of the first attach that asked for stdin */
static struct partial partial[2];
static struct conn conns[MAX_CONNS];
static int ctl_fd = -1;
static int sig_fd = -1;

static char read_buf[READ_SIZE];
static char fmt_buf[FMT_SIZE];
static size_t fmt_len;
static char stdin_buf[READ_SIZE];
static size_t stdin_len, stdin_off;
static char msg_buf[READ_SIZE + 1];

/* Statuses of children reaped before the init's pid was known (a fast container). */
static struct { pid_t pid; int status; long long when; } early[MAX_EARLY];
static int n_early;

static void warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "ctrmon: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static long long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The sync pipe's one message; a daemon that is gone just misses it. */
static void sync_report(const char *json) {
    if (opt.sync_fd < 0)
        return;
    if (write_all(opt.sync_fd, json, strlen(json)) < 0)
        warn("sync pipe: %s", strerror(errno));
    close(opt.sync_fd);
    opt.sync_fd = -1;
}

static void json_escape(char *out, size_t size, const char *s) {
    size_t o = 0;
    for (; *s && o + 7 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, size - o, "\\u%04x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = 0;
}

static void __attribute__((noreturn)) fail(const char *fmt, ...) {
    char text[512], esc[1100], line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    warn("%s", text);
    json_escape(esc, sizeof esc, text);
    snprintf(line, sizeof line, "{\"error\":\"%s\"}\n", esc);
    sync_report(line);
    exit(1);
}

static void path_in_bundle(char *out, size_t size, const char *name) {
    if ((size_t)snprintf(out, size, "%s/%s", opt.bundle, name) >= size)
        fail("bundle path too long");
}

/* Write a small file of the bundle (our cwd) whole or not at all: temp + rename. */
static int write_atomic(const char *name, const char *content) {
    char tmp[64];
    snprintf(tmp, sizeof tmp, "%s.tmp", name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    if (write_all(fd, content, strlen(content)) < 0) {
        close(fd);
        return -1;
    }
    if (close(fd) < 0)
        return -1;
    return rename(tmp, name);
}

/* --- the CRI log ---------------------------------------------------------------------------- */

static int mkdir_parents(const char *path) {
    char buf[4096];
    if (strlen(path) >= sizeof buf)
        return -1;
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return 0;
}

static int open_log(void) {
    if (mkdir_parents(opt.log_path) < 0)
        return -1;
    /* O_NOFOLLOW: a symlink put where the log goes is never written through. */
    return open(opt.log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
}

/* Output dropped since the log last took a write (a full disk, a failed reopen). */
static unsigned long long log_lost;
static int log_failing;

static void flush_log(void) {
    if (fmt_len == 0)
        return;
    if (log_fd < 0)
        log_fd = open_log();  /* a failed reopen is retried; meanwhile the output has no home */
    if (log_fd >= 0) {
        struct stat st;
        off_t start = fstat(log_fd, &st) == 0 ? st.st_size : -1;
        if (write_all(log_fd, fmt_buf, fmt_len) == 0) {
            if (log_failing)
                warn("log %s: written again, %llu bytes lost meanwhile", opt.log_path, log_lost);
            log_failing = 0;
            log_lost = 0;
            fmt_len = 0;
            return;
        }
        /* A write cut half-way (ENOSPC) would leave half a record for the next one to run
         * into: the file is cut back to where this flush began. */
        int saved = errno;
        if (start >= 0 && fstat(log_fd, &st) == 0 && st.st_size > start &&
            ftruncate(log_fd, start) < 0)
            warn("log %s: cannot cut a partial record: %s", opt.log_path, strerror(errno));
        errno = saved;
    }
    /* The container is never held up: its output is dropped until the log takes writes
     * again. One line per episode: a full disk must not fill the bundle's ctrmon.log too. */
    log_lost += fmt_len;
    if (!log_failing)
        warn("log %s: %s: output dropped until it can be written", opt.log_path,
             strerror(errno));
    log_failing = 1;
    fmt_len = 0;
}

static char stamp[40];
static size_t stamp_len;

static void set_stamp(long long t) {
    struct tm tm;
    time_t sec = (time_t)(t / 1000000000LL);
    gmtime_r(&sec, &tm);
    stamp_len = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    stamp_len += (size_t)snprintf(stamp + stamp_len, sizeof stamp - stamp_len, ".%09lldZ ",
                                  t % 1000000000LL);
}

/* One record; its content is a[0..alen) followed by b[0..blen). */
static void record(int stream, char tag, const char *a, size_t alen, const char *b, size_t blen) {
    if (FMT_SIZE - fmt_len < RECORD_MAX)
        flush_log();
    const char *name = stream == OUT_STDOUT ? "stdout " : "stderr ";
    char *p = fmt_buf + fmt_len;
    memcpy(p, stamp, stamp_len);
    p += stamp_len;
    memcpy(p, name, 7);
    p += 7;
    *p++ = tag;
    *p++ = ' ';
    memcpy(p, a, alen);
    p += alen;
    memcpy(p, b, blen);
    p += blen;
    *p++ = '\n';
    fmt_len = (size_t)(p - fmt_buf);
}

/* Records for the bytes [from, to) of the concatenation of a and b. */
static void records_span(int stream, char tag, const char *a, size_t alen, const char *b,
                         size_t from, size_t to) {
    const char *pa = from < alen ? a + from : NULL;
    size_t na = from < alen ? (to < alen ? to : alen) - from : 0;
    size_t bfrom = from > alen ? from - alen : 0;
    size_t nb = to > alen ? to - alen - bfrom : 0;
    record(stream, tag, pa ? pa : "", na, b + bfrom, nb);
}

/* A whole line = partial + seg: split at MAX_LINE, P pieces then F (ContainerLog._line). */
static void line(int stream, const char *seg, size_t seglen) {
    struct partial *pt = &partial[stream];
    size_t total = pt->len + seglen;
    size_t i = 0;
    while (total - i > MAX_LINE) {
        records_span(stream, 'P', pt->data, pt->len, seg, i, i + MAX_LINE);
        i += MAX_LINE;
    }
    records_span(stream, 'F', pt->data, pt->len, seg, i, total);
    pt->len = 0;
}

/* ContainerLog._records for one read: whole lines now, the rest kept (long ones cut early). */
static void log_data(int stream, const char *data, size_t n, long long t) {
    struct partial *pt = &partial[stream];
    size_t start = 0;
    const char *nl;
    while (start < n && (nl = memchr(data + start, '\n', n - start)) != NULL) {
        size_t end = (size_t)(nl - data);
        line(stream, data + start, end - start);
        start = end + 1;
    }
    if (start == n)
        return;
    const char *rest = data + start;
    size_t rlen = n - start, total = pt->len + rlen;
    pt->time_ns = t;
    if (total <= MAX_LINE) {
        memcpy(pt->data + pt->len, rest, rlen);
        pt->len = total;
        return;
    }
    size_t cut = (total - 1) / MAX_LINE * MAX_LINE;  /* keep 1..MAX_LINE bytes back */
    for (size_t i = 0; i < cut; i += MAX_LINE)
        records_span(stream, 'P', pt->data, pt->len, rest, i, i + MAX_LINE);
    size_t keep = total - cut;
    if (cut < pt->len) {  /* part of what is kept was already in the partial buffer */
        size_t own = pt->len - cut;
        memmove(pt->data, pt->data + cut, own);
        memcpy(pt->data + own, rest, rlen);
    } else {
        memcpy(pt->data, rest + (cut - pt->len), keep);
    }
    pt->len = keep;
}

/* The unfinished lines as P records, oldest first (ContainerLog.close). */
static void log_tails(void) {
    int order[2] = {OUT_STDOUT, OUT_STDERR};
    if (partial[1].len && (!partial[0].len || partial[1].time_ns < partial[0].time_ns)) {
        order[0] = OUT_STDERR;
        order[1] = OUT_STDOUT;
    }
    for (int k = 0; k < 2; k++) {
        struct partial *pt = &partial[order[k]];
        if (!pt->len)
            continue;
        set_stamp(pt->time_ns);
        record(order[k], 'P', pt->data, pt->len, "", 0);
        pt->len = 0;
    }
    flush_log();
}

/* --- attach clients and stdin -------------------------------------------------------------- */

static void close_stdin_now(void) {
    if (stdin_fd >= 0 && !opt.tty)  /* a pty stays: closing the master would hang it up */
        close(stdin_fd);
    if (!opt.tty)
        stdin_fd = -1;
    stdin_len = stdin_off = 0;
    stdin_close_pending = 0;
}

static void close_stdin(void) {
    if (stdin_len > stdin_off)
        stdin_close_pending = 1;  /* after what clients already sent */
    else
        close_stdin_now();
}

static void drop_conn(int i) {
    if (conns[i].kind == CONN_FREE)
        return;
    close(conns[i].fd);
    conns[i].kind = CONN_FREE;
    conns[i].fd = -1;
    if (i == stdin_once_conn) {
        stdin_once_conn = -2;  /* only the first such client counts */
        if (opt.stdin_once)
            close_stdin();
    }
}

static void send_frames(int stream, const char *data, size_t n) {
    unsigned char tag = (unsigned char)(stream + 1);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].kind != CONN_ATTACH)
            continue;
        for (size_t off = 0; off < n; off += FRAME_MAX) {
            size_t len = n - off < FRAME_MAX ? n - off : FRAME_MAX;
            struct iovec iov[2] = {{&tag, 1}, {(void *)(data + off), len}};
            struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
            if (sendmsg(conns[i].fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
                /* Too slow (or gone): the client is dropped, never the log. */
                drop_conn(i);
                break;
            }
        }
    }
}

static void pump_stdin(void) {
    while (stdin_fd >= 0 && stdin_off < stdin_len) {
        ssize_t w = write(stdin_fd, stdin_buf + stdin_off, stdin_len - stdin_off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            warn("container stdin: %s", strerror(errno));
            stdin_len = stdin_off = 0;
            close_stdin_now();
            return;
        }
        stdin_off += (size_t)w;
    }
    stdin_len = stdin_off = 0;
    if (stdin_close_pending)
        close_stdin_now();
}

static int parse_size(const char *s, struct winsize *ws) {
    unsigned rows, cols;
    if (sscanf(s, "%u %u", &rows, &cols) != 2 || rows > 65535 || cols > 65535)
        return -1;
    memset(ws, 0, sizeof *ws);
    ws->ws_row = (unsigned short)rows;
    ws->ws_col = (unsigned short)cols;
    return 0;
}

static const char *resize(const char *arg) {
    struct winsize ws;
    if (!opt.tty)
        return "error not a tty";
    if (parse_size(arg, &ws) < 0)
        return "error bad size";
    if (ioctl(out_fd[0], TIOCSWINSZ, &ws) < 0)
        return "error resize failed";
    return "ok";
}

static void reply(int i, const char *text) {
    if (send(conns[i].fd, text, strlen(text), MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        drop_conn(i);
}

static void ctl_command(int i, size_t n) {
    char errbuf[300];
    msg_buf[n] = 0;
    if (strcmp(msg_buf, "reopen") == 0) {
        flush_log();  /* what was formatted belongs to the old file */
        if (log_fd >= 0)
            close(log_fd);
        log_fd = open_log();
        if (log_fd < 0) {
            snprintf(errbuf, sizeof errbuf, "error cannot open %s: %s", opt.log_path,
                     strerror(errno));
            reply(i, errbuf);
        } else {
            reply(i, "ok");
        }
    } else if (strncmp(msg_buf, "attach ", 7) == 0) {
        conns[i].kind = CONN_ATTACH;
        conns[i].wants_stdin = msg_buf[7] == '1';
        if (conns[i].wants_stdin && stdin_once_conn == -1)
            stdin_once_conn = i;
        reply(i, "ok");
    } else if (strncmp(msg_buf, "resize ", 7) == 0) {
        reply(i, resize(msg_buf + 7));
    } else if (strcmp(msg_buf, "close-stdin") == 0) {
        close_stdin();
        reply(i, "ok");
    } else {
        reply(i, "error unknown command");
    }
}

static void attach_message(int i, size_t n) {
    if (n == 0)
        return;
    switch (msg_buf[0]) {
    case 0:
        if (!conns[i].wants_stdin || stdin_fd < 0 || stdin_close_pending)
            return;
        memcpy(stdin_buf, msg_buf + 1, n - 1);  /* stdin_buf is empty: see poll set */
        stdin_len = n - 1;
        stdin_off = 0;
        pump_stdin();
        break;
    case 3:
        if (conns[i].wants_stdin && opt.stdin_once)
            close_stdin();
        break;
    case 4: {
        msg_buf[n] = 0;
        resize(msg_buf + 1);
        break;
    }
    }
}

static void conn_readable(int i) {
    ssize_t n = recv(conns[i].fd, msg_buf, READ_SIZE, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        drop_conn(i);
        return;
    }
    if (conns[i].kind == CONN_CTL)
        ctl_command(i, (size_t)n);
    else
        attach_message(i, (size_t)n);
}

static void accept_conn(void) {
    int fd = accept4(ctl_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].kind == CONN_FREE) {
            conns[i] = (struct conn){.fd = fd, .kind = CONN_CTL};
            return;
        }
    }
    close(fd);  /* full */
}

/* --- output --------------------------------------------------------------------------------- */

/* Read once from a stream; returns bytes read, 0 at EOF (the fd is closed), -1 if none ready. */
static ssize_t pump_output(int stream) {
    ssize_t n = read(out_fd[stream], read_buf, READ_SIZE);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return -1;
    if (n <= 0) {  /* EOF, or EIO from a pty whose slave is gone */
        close(out_fd[stream]);
        if (opt.tty && stdin_fd == out_fd[stream])
            stdin_fd = -1;
        out_fd[stream] = -1;
        return 0;
    }
    long long t = now_ns(CLOCK_REALTIME);
    set_stamp(t);
    log_data(stream, read_buf, (size_t)n, t);
    flush_log();
    send_frames(stream, read_buf, (size_t)n);
    return n;
}

/* --- processes ------------------------------------------------------------------------------ */

static void restore_child_signals(void) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int sigs[] = {SIGPIPE, SIGHUP, SIGTERM, SIGINT, SIGCHLD};
    for (size_t k = 0; k < sizeof sigs / sizeof sigs[0]; k++)
        signal(sigs[k], SIG_DFL);  /* ignored signals stay ignored across exec */
}

static pid_t spawn(const char **argv, int in, int out, int err) {
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    restore_child_signals();
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        _exit(127);
    execv(argv[0], (char *const *)argv);
    fprintf(stderr, "ctrmon: exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static int runc_argv(const char **argv, const char *log) {
    int n = 0;
    argv[n++] = opt.runc;
    argv[n++] = "--root";
    argv[n++] = opt.root;
    if (log) {
        argv[n++] = "--log";
        argv[n++] = log;
        argv[n++] = "--log-format";
        argv[n++] = "json";
    }
    for (int k = 0; k < opt.n_runc_args; k++)
        argv[n++] = opt.runc_args[k];
    return n;
}

/* Reap every child that has exited; returns whether `want` was among them (status in *status).
 * Before the init's pid is known (`keep`), the others' statuses are kept for later. */
static int reap(pid_t want, int *status, int keep) {
    int st, found = 0;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == want) {
            *status = st;
            found = 1;
        } else if (keep && n_early < MAX_EARLY) {
            early[n_early].pid = pid;
            early[n_early].status = st;
            early[n_early].when = now_ns(CLOCK_REALTIME);
            n_early++;
        }
    }
    return found;
}

static void drain_sigfd(void) {
    struct signalfd_siginfo si;
    while (read(sig_fd, &si, sizeof si) > 0) {
    }
}

static void kill_all(void) {
    const char *argv[MAX_RUNC_ARGS + 16];
    int n = runc_argv(argv, NULL);
    argv[n++] = "kill";
    argv[n++] = "--all";
    argv[n++] = opt.id;
    argv[n++] = "KILL";
    argv[n] = NULL;
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    pid_t pid = spawn(argv, devnull, 2, 2);
    close(devnull);
    if (pid < 0) {
        warn("kill --all: fork: %s", strerror(errno));
        return;
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        warn("runc kill --all %s: status %d", opt.id, st);
}

/* --- set-up --------------------------------------------------------------------------------- */

static void usage(void) {
    fail("usage: ctrmon create --runc PATH --root DIR --bundle DIR --id ID --log PATH "
         "[--tty] [--stdin] [--stdin-once] [--kill-all] [--runc-arg ARG]... [--sync-fd N]");
}

static void parse_args(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char **val = NULL;
        if (strcmp(a, "--tty") == 0) opt.tty = 1;
        else if (strcmp(a, "--stdin") == 0) opt.stdin_ = 1;
        else if (strcmp(a, "--stdin-once") == 0) opt.stdin_once = 1;
        else if (strcmp(a, "--kill-all") == 0) opt.kill_all = 1;
        else if (strcmp(a, "--runc") == 0) val = &opt.runc;
        else if (strcmp(a, "--root") == 0) val = &opt.root;
        else if (strcmp(a, "--bundle") == 0) val = &opt.bundle;
        else if (strcmp(a, "--id") == 0) val = &opt.id;
        else if (strcmp(a, "--log") == 0) val = &opt.log_path;
        else if (strcmp(a, "--sync-fd") == 0 && i + 1 < argc) opt.sync_fd = atoi(argv[++i]);
        else if (strcmp(a, "--runc-arg") == 0 && i + 1 < argc && opt.n_runc_args < MAX_RUNC_ARGS)
            opt.runc_args[opt.n_runc_args++] = argv[++i];
        else
            fail("unknown or misplaced argument %s", a);
        if (val) {
            if (i + 1 >= argc)
                usage();
            *val = argv[++i];
        }
    }
    if (!opt.runc || !opt.root || !opt.bundle || !opt.id || !opt.log_path)
        usage();
    if (opt.bundle[0] != '/' || opt.log_path[0] != '/')
        fail("--bundle and --log must be absolute paths");
}

/* Unix socket paths are short (108 bytes): bind by a name relative to the bundle (our cwd). */
static int listen_unix(const char *name, int type) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, name);
    unlink(name);
    int fd = socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    mode_t old = umask(0077);  /* mode 0600 from birth: no window for another user */
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    umask(old);
    if (rc < 0 || listen(fd, 16) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void big_pipe(int fds[2]) {
    if (pipe2(fds, O_CLOEXEC) < 0)
        fail("pipe: %s", strerror(errno));
    fcntl(fds[0], F_SETPIPE_SZ, PIPE_SIZE);  /* best-effort: pipe-max-size may be lower */
}

/* The pty master runc sends over the console socket (SCM_RIGHTS). */
static int recv_console(int lfd) {
    int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0)
        return -1;
    char data[256];
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {data, sizeof data};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof cbuf};
    int fd = -1;
    if (recvmsg(c, &msg, MSG_CMSG_CLOEXEC) >= 0) {
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    }
    close(c);
    return fd;
}

static void daemonize(void) {
    pid_t pid = fork();
    if (pid < 0)
        fail("fork: %s", strerror(errno));
    if (pid > 0)
        _exit(0);  /* the daemon reaps this one at once; it never has a long-lived child */
    setsid();
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
        fail("PR_SET_CHILD_SUBREAPER: %s", strerror(errno));
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, "-999", 4) < 0) {
            /* unprivileged: keep the inherited score */
        }
        close(fd);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    int diag = open("ctrmon.log", O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (devnull >= 0) {
        dup2(devnull, 0);
        dup2(diag >= 0 ? diag : devnull, 1);
        dup2(diag >= 0 ? diag : devnull, 2);
    }
    setvbuf(stderr, NULL, _IOLBF, 0);
    char pidtext[32];
    snprintf(pidtext, sizeof pidtext, "%d\n", getpid());
    if (write_atomic("ctrmon.pid", pidtext) < 0)
        fail("write ctrmon.pid: %s", strerror(errno));
}

/* Runs runc create; returns the init's pid, or reports the failure and exits. */
static pid_t runc_create(int in, int out, int err) {
    char runc_log[4096], pid_file[4096], console[4096];
    path_in_bundle(runc_log, sizeof runc_log, "runc.log");
    path_in_bundle(pid_file, sizeof pid_file, "init.pid");
    int console_fd = -1;
    const char *argv[MAX_RUNC_ARGS + 24];
    int n = runc_argv(argv, runc_log);
    argv[n++] = "create";
    argv[n++] = "--bundle";
    argv[n++] = opt.bundle;
    argv[n++] = "--pid-file";
    argv[n++] = pid_file;
    if (opt.tty) {
        console_fd = listen_unix("console.sock", SOCK_STREAM);
        if (console_fd < 0)
            fail("console socket: %s", strerror(errno));
        path_in_bundle(console, sizeof console, "console.sock");
        argv[n++] = "--console-socket";
        /* runc runs in the bundle too: a relative name when the full one does not fit */
        argv[n++] = strlen(console) < sizeof(((struct sockaddr_un *)0)->sun_path) ? console
                                                                                : "console.sock";
    }
    argv[n++] = opt.id;
    argv[n] = NULL;
    unlink(pid_file);
    pid_t runc = spawn(argv, in, out, err);
    if (runc < 0)
        fail("fork runc: %s", strerror(errno));
    int status = 0, done = 0;
    while (!done) {
        struct pollfd p[2] = {{sig_fd, POLLIN, 0}, {console_fd, POLLIN, 0}};
        nfds_t np = console_fd >= 0 && out_fd[0] < 0 ? 2 : 1;
        if (poll(p, np, -1) < 0 && errno != EINTR)
            fail("poll: %s", strerror(errno));
        if (np == 2 && (p[1].revents & POLLIN))
            out_fd[0] = recv_console(console_fd);
        if (p[0].revents & POLLIN) {
            drain_sigfd();
            done = reap(runc, &status, 1);
        }
    }
    if (console_fd >= 0 && out_fd[0] < 0)
        out_fd[0] = recv_console(console_fd);  /* runc is gone: its connection may be queued */
    if (console_fd >= 0) {
        close(console_fd);
        unlink("console.sock");
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        char line[128];
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        snprintf(line, sizeof line, "{\"error\":\"runc create failed\",\"status\":%d}\n", code);
        warn("runc create %s: status %d", opt.id, code);
        sync_report(line);
        exit(1);
    }
    if (opt.tty && out_fd[0] < 0)
        fail("runc sent no console over %s/console.sock", opt.bundle);
    char buf[32] = {0};
    int fd = open(pid_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, buf, sizeof buf - 1) <= 0)
        fail("read %s: %s", pid_file, strerror(errno));
    close(fd);
    pid_t pid = (pid_t)atoi(buf);
    if (pid <= 0)
        fail("bad pid in %s", pid_file);
    return pid;
}

/* --- the loop ------------------------------------------------------------------------------- */

static void write_exit(int status, long long finished) {
    int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    int code = sig ? 128 + sig : WEXITSTATUS(status);
    char text[128];
    snprintf(text, sizeof text, "{\"exit_code\":%d,\"signal\":%d,\"finished_at\":%lld}\n", code,
             sig, finished);
    if (write_atomic("exit", text) < 0)
        warn("write exit: %s", strerror(errno));
}

static void run(pid_t init) {
    int status = 0, exited = 0;
    long long finished = 0, drain_deadline = 0;
    for (int k = 0; k < n_early; k++) {
        if (early[k].pid == init) {
            status = early[k].status;
            finished = early[k].when;
            exited = 1;
        }
    }
    struct pollfd p[4 + MAX_CONNS];
    int idx[4 + MAX_CONNS];
    for (;;) {
        if (exited && drain_deadline == 0) {
            if (opt.kill_all)
                kill_all();  /* a leftover holding the pipes would block EOF */
            drain_deadline = now_ns(CLOCK_MONOTONIC) + DRAIN_MS * 1000000LL;
        }
        if (exited && out_fd[0] < 0 && out_fd[1] < 0)
            break;
        int timeout = -1;
        if (exited) {
            long long left = drain_deadline - now_ns(CLOCK_MONOTONIC);
            if (left <= 0) {
                /* No progress for 2 s: take what is buffered without waiting, then stop. */
                for (int s = 0; s < 2; s++) {
                    if (out_fd[s] < 0)
                        continue;
                    fcntl(out_fd[s], F_SETFL, fcntl(out_fd[s], F_GETFL) | O_NONBLOCK);
                    while (out_fd[s] >= 0 && pump_output(s) > 0) {
                    }
                    if (out_fd[s] >= 0) {
                        close(out_fd[s]);
                        out_fd[s] = -1;
                    }
                }
                break;
            }
            timeout = (int)(left / 1000000LL) + 1;
        }
        int n = 0;
        p[n] = (struct pollfd){sig_fd, POLLIN, 0}; idx[n++] = -1;
        p[n] = (struct pollfd){ctl_fd, POLLIN, 0}; idx[n++] = -2;
        for (int s = 0; s < 2; s++) {
            if (out_fd[s] >= 0) {
                p[n] = (struct pollfd){out_fd[s], POLLIN, 0};
                idx[n++] = -10 - s;
            }
        }
        if (stdin_fd >= 0 && stdin_off < stdin_len) {
            p[n] = (struct pollfd){stdin_fd, POLLOUT, 0};
            idx[n++] = -3;
        }
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].kind == CONN_FREE)
                continue;
            /* While stdin is backed up, clients' stdin waits in their sockets. */
            short ev = conns[i].kind == CONN_ATTACH && stdin_off < stdin_len ? 0 : POLLIN;
            p[n] = (struct pollfd){conns[i].fd, ev, 0};
            idx[n++] = i;
        }
        if (poll(p, (nfds_t)n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            warn("poll: %s", strerror(errno));
            break;
        }
        for (int k = 0; k < n; k++) {
            if (!p[k].revents)
                continue;
            if (idx[k] == -1) {
                drain_sigfd();
                if (!exited && reap(init, &status, 0)) {
                    exited = 1;
                    finished = now_ns(CLOCK_REALTIME);
                } else if (exited) {
                    int ignored;
                    reap(-1, &ignored, 0);
                }
            } else if (idx[k] == -2) {
                accept_conn();
            } else if (idx[k] <= -10) {
                int s = -10 - idx[k];
                if (out_fd[s] >= 0 && pump_output(s) > 0 && exited)
                    drain_deadline = now_ns(CLOCK_MONOTONIC) + DRAIN_MS * 1000000LL;
            } else if (idx[k] == -3) {
                pump_stdin();
            } else if (conns[idx[k]].kind != CONN_FREE && conns[idx[k]].fd == p[k].fd) {
                if (p[k].revents & POLLIN)
                    conn_readable(idx[k]);
                else if (p[k].revents & (POLLHUP | POLLERR))
                    drop_conn(idx[k]);
            }
        }
    }
    log_tails();
    if (log_fd >= 0)
        close(log_fd);
    log_fd = -1;
    close(ctl_fd);
    unlink("ctl");
    write_exit(status, finished);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].kind != CONN_FREE) {
            close(conns[i].fd);  /* frames already queued stay readable by the client */
            conns[i].kind = CONN_FREE;
        }
    }
}

/*
 * `ctrmon pause`: PID 1 of a host pod's shared PID namespace (the runc backend's infra
 * container, criserver/backends/runc/infra.py). It reaps what is re-parented to it and exits 0 on
 * SIGTERM or SIGINT; being PID 1 it gets no other signal it has no handler for.
 */
static int pause_forever(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig == SIGTERM || sig == SIGINT)
            return 0;
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
    }
}

/*
 * `ctrmon exec`: a tty exec (design 3.1). runc takes a console socket only when it detaches,
 * and a detached exec's status goes to a subreaper: we are both. An ordinary child of the
 * daemon, which gets its exit code (the exec'd process's).
 */
static struct {
    const char *process, *pid_file, *console, *runc_log;
    int resize_fd;
} xopt = {.resize_fd = -1};

static void exec_usage(void) {
    fail("usage: ctrmon exec --runc PATH --root DIR --bundle DIR --id ID --process FILE "
         "--pid-file FILE --console NAME [--runc-log FILE] [--resize-fd N] [--sync-fd N] "
         "[--runc-arg ARG]...");
}

static void parse_exec_args(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char **val = NULL;
        if (strcmp(a, "--runc") == 0) val = &opt.runc;
        else if (strcmp(a, "--root") == 0) val = &opt.root;
        else if (strcmp(a, "--bundle") == 0) val = &opt.bundle;
        else if (strcmp(a, "--id") == 0) val = &opt.id;
        else if (strcmp(a, "--process") == 0) val = &xopt.process;
        else if (strcmp(a, "--pid-file") == 0) val = &xopt.pid_file;
        else if (strcmp(a, "--console") == 0) val = &xopt.console;
        else if (strcmp(a, "--runc-log") == 0) val = &xopt.runc_log;
        else if (strcmp(a, "--sync-fd") == 0 && i + 1 < argc) opt.sync_fd = atoi(argv[++i]);
        else if (strcmp(a, "--resize-fd") == 0 && i + 1 < argc) xopt.resize_fd = atoi(argv[++i]);
        else if (strcmp(a, "--runc-arg") == 0 && i + 1 < argc && opt.n_runc_args < MAX_RUNC_ARGS)
            opt.runc_args[opt.n_runc_args++] = argv[++i];
        else
            fail("unknown or misplaced argument %s", a);
        if (val) {
            if (i + 1 >= argc)
                exec_usage();
            *val = argv[++i];
        }
    }
    if (!opt.runc || !opt.root || !opt.bundle || !opt.id || !xopt.process || !xopt.pid_file ||
        !xopt.console)
        exec_usage();
    if (strchr(xopt.console, '/') ||
        strlen(xopt.console) >= sizeof(((struct sockaddr_un *)0)->sun_path))
        fail("--console must be a short file name (it is made in the bundle)");
}

enum { SIG_CHLD = 1, SIG_STOP = 2 };

/* Read the pending signals: SIG_CHLD and/or SIG_STOP (SIGTERM, SIGINT, SIGHUP). */
static int take_signals(void) {
    struct signalfd_siginfo si;
    int got = 0;
    while (read(sig_fd, &si, sizeof si) == (ssize_t)sizeof si)
        got |= si.ssi_signo == SIGCHLD ? SIG_CHLD : SIG_STOP;
    return got;
}

static int exit_code(int status) {
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* Runs runc exec --detach; returns the exec'd pid with the pty master in *master. */
static pid_t runc_exec(int *master, int *stop) {
    char console[4096];
    int console_fd = listen_unix(xopt.console, SOCK_STREAM);
    if (console_fd < 0)
        fail("console socket %s/%s: %s", opt.bundle, xopt.console, strerror(errno));
    path_in_bundle(console, sizeof console, xopt.console);
    const char *argv[MAX_RUNC_ARGS + 24];
    int n = runc_argv(argv, xopt.runc_log);
    argv[n++] = "exec";
    argv[n++] = "--detach";
    argv[n++] = "--tty";
    argv[n++] = "--console-socket";
    /* runc runs in the bundle too: a relative name when the full one does not fit */
    argv[n++] = strlen(console) < sizeof(((struct sockaddr_un *)0)->sun_path) ? console
                                                                            : xopt.console;
    argv[n++] = "--pid-file";
    argv[n++] = xopt.pid_file;
    argv[n++] = "--process";
    argv[n++] = xopt.process;
    argv[n++] = opt.id;
    argv[n] = NULL;
    unlink(xopt.pid_file);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    pid_t runc = spawn(argv, devnull, 2, 2);  /* runc's messages go to our stderr */
    close(devnull);
    if (runc < 0)
        fail("fork runc: %s", strerror(errno));
    int status = 0, done = 0;
    *master = -1;
    while (!done) {
        struct pollfd p[2] = {{sig_fd, POLLIN, 0}, {console_fd, POLLIN, 0}};
        nfds_t np = *master < 0 ? 2 : 1;
        if (poll(p, np, -1) < 0 && errno != EINTR)
            fail("poll: %s", strerror(errno));
        if (np == 2 && (p[1].revents & POLLIN))
            *master = recv_console(console_fd);
        if (p[0].revents & POLLIN) {
            int got = take_signals();
            *stop |= got & SIG_STOP;
            if (got & SIG_CHLD)
                done = reap(runc, &status, 1);
        }
    }
    if (*master < 0)
        *master = recv_console(console_fd);  /* runc is gone: its connection may be queued */
    close(console_fd);
    unlink(xopt.console);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        char line[128];
        snprintf(line, sizeof line, "{\"error\":\"runc exec failed\",\"status\":%d}\n",
                 exit_code(status));
        warn("runc exec %s: status %d", opt.id, exit_code(status));
        sync_report(line);
        exit(1);
    }
    char buf[32] = {0};
    int fd = open(xopt.pid_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, buf, sizeof buf - 1) <= 0)
        fail("read %s: %s", xopt.pid_file, strerror(errno));
    close(fd);
    pid_t pid = (pid_t)atoi(buf);
    if (pid <= 0)
        fail("bad pid in %s", xopt.pid_file);
    if (*master < 0) {
        kill(pid, SIGKILL);  /* a process nobody can talk to */
        fail("runc sent no console over %s/%s", opt.bundle, xopt.console);
    }
    return pid;
}

/* Apply the complete "rows cols" lines of the resize fd; returns 0 at its EOF. */
static int read_resizes(int master, char *buf, size_t *len, size_t size) {
    ssize_t n = read(xopt.resize_fd, buf + *len, size - 1 - *len);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR;
    if (n == 0)
        return 0;
    *len += (size_t)n;
    buf[*len] = 0;
    char *line = buf, *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = 0;
        struct winsize ws;
        if (master >= 0 && parse_size(line, &ws) == 0 && ioctl(master, TIOCSWINSZ, &ws) < 0)
            warn("resize: %s", strerror(errno));
        line = nl + 1;
    }
    *len = strlen(line);
    memmove(buf, line, *len);
    if (*len == size - 1)
        *len = 0;  /* no newline in a full buffer: garbage */
    return 1;
}

static int exec_tty(void) {
    if (chdir(opt.bundle) < 0)
        fail("bundle %s: %s", opt.bundle, strerror(errno));
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
        fail("PR_SET_CHILD_SUBREAPER: %s", strerror(errno));
    /* The daemon gone (crashed) is the client gone: the process is killed, as on cancel. */
    pid_t daemon_pid = getppid();
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP};
    for (size_t k = 0; k < sizeof sigs / sizeof sigs[0]; k++)
        sigaddset(&set, sigs[k]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sig_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sig_fd < 0)
        fail("signalfd: %s", strerror(errno));
    if (getppid() != daemon_pid)
        fail("the daemon is gone");
    if (xopt.resize_fd >= 0) {
        fcntl(xopt.resize_fd, F_SETFD, FD_CLOEXEC);
        fcntl(xopt.resize_fd, F_SETFL, fcntl(xopt.resize_fd, F_GETFL) | O_NONBLOCK);
    }

    int master, stop = 0;
    pid_t pid = runc_exec(&master, &stop);
    int status = 0, exited = 0;
    for (int k = 0; k < n_early; k++) {
        if (early[k].pid == pid) {  /* it ended before runc did */
            status = early[k].status;
            exited = 1;
        }
    }
    char ok[64];
    snprintf(ok, sizeof ok, "{\"pid\":%d}\n", pid);
    sync_report(ok);
    if (stop && !exited)
        kill(pid, SIGKILL);  /* still our child (unreaped): the pid is its own */

    for (int fd = 0; fd < 2; fd++)
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
    static char out[READ_SIZE], in[READ_SIZE], rbuf[256];
    size_t out_len = 0, out_off = 0, in_len = 0, in_off = 0, rlen = 0;
    int in_open = 1, out_ok = 1, eot = 0;
    long long deadline = 0;
    for (;;) {
        if (exited && deadline == 0)
            deadline = now_ns(CLOCK_MONOTONIC) + DRAIN_MS * 1000000LL;
        if (exited && master < 0 && out_off == out_len)
            break;  /* all the output is written */
        int timeout = -1;
        if (exited) {
            long long left = deadline - now_ns(CLOCK_MONOTONIC);
            if (left <= 0)
                break;  /* a leftover holds the pty, or the daemon stopped reading */
            timeout = (int)(left / 1000000LL) + 1;
        }
        struct pollfd p[5];
        int n = 0, i_sig = -1, i_master = -1, i_in = -1, i_out = -1, i_rs = -1;
        p[i_sig = n++] = (struct pollfd){sig_fd, POLLIN, 0};
        if (master >= 0) {
            short ev = (out_len == 0 ? POLLIN : 0) | (in_off < in_len || eot == 1 ? POLLOUT : 0);
            p[i_master = n++] = (struct pollfd){master, ev, 0};
        }
        if (in_open && in_len == 0 && !exited)
            p[i_in = n++] = (struct pollfd){0, POLLIN, 0};
        if (out_off < out_len)
            p[i_out = n++] = (struct pollfd){1, POLLOUT, 0};
        if (xopt.resize_fd >= 0)
            p[i_rs = n++] = (struct pollfd){xopt.resize_fd, POLLIN, 0};
        if (poll(p, (nfds_t)n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            warn("poll: %s", strerror(errno));
            break;
        }
        if (p[i_sig].revents) {
            int got = take_signals();
            if ((got & SIG_STOP) && !exited)
                kill(pid, SIGKILL);
            if (got & SIG_CHLD) {
                int ignored;
                if (exited)
                    reap(-1, &ignored, 0);
                else
                    exited = reap(pid, &status, 0);
            }
        }
        if (i_master >= 0 && (p[i_master].revents & POLLOUT)) {
            ssize_t w = in_off < in_len ? write(master, in + in_off, in_len - in_off)
                                        : write(master, "\x04", 1);  /* stdin's end: EOT */
            if (w > 0 && in_off < in_len) {
                in_off += (size_t)w;
                if (in_off == in_len)
                    in_len = in_off = 0;
            } else if (w > 0) {
                eot = 2;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                in_len = in_off = 0;
                eot = 2;
            }
        }
        if (i_master >= 0 && (p[i_master].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t r = read(master, out, sizeof out);
            if (r > 0) {
                out_len = (size_t)r;
                out_off = 0;
                if (!out_ok)
                    out_len = 0;  /* the daemon is gone: keep the pty moving */
                if (exited)
                    deadline = now_ns(CLOCK_MONOTONIC) + DRAIN_MS * 1000000LL;
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(master);  /* EIO: every slave fd is closed */
                master = -1;
            }
        }
        if (i_in >= 0 && p[i_in].revents) {
            ssize_t r = read(0, in, sizeof in);
            if (r > 0) {
                in_len = (size_t)r;
                in_off = 0;
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                in_open = 0;
                if (r == 0 && eot == 0)
                    eot = 1;
            }
        }
        if (i_out >= 0 && p[i_out].revents) {
            ssize_t w = write(1, out + out_off, out_len - out_off);
            if (w > 0) {
                out_off += (size_t)w;
                if (exited)
                    deadline = now_ns(CLOCK_MONOTONIC) + DRAIN_MS * 1000000LL;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                out_ok = 0;  /* EPIPE: the daemon closed its end (the client left) */
                out_off = out_len;
            }
            if (out_off == out_len)
                out_len = out_off = 0;
        }
        if (i_rs >= 0 && p[i_rs].revents &&
            !read_resizes(master, rbuf, &rlen, sizeof rbuf)) {
            close(xopt.resize_fd);
            xopt.resize_fd = -1;
        }
    }
    if (!exited) {  /* the loop broke on a poll error: do not leave it behind */
        kill(pid, SIGKILL);
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
    }
    return exit_code(status);
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("ctrmon %d\n", PROTOCOL);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "pause") == 0)
        return pause_forever();
    if (argc >= 2 && strcmp(argv[1], "exec") == 0) {
        parse_exec_args(argc, argv);
        if (fcntl(opt.sync_fd, F_SETFD, FD_CLOEXEC) < 0)
            opt.sync_fd = -1;
        return exec_tty();
    }
    if (argc < 2 || strcmp(argv[1], "create") != 0) {
        opt.sync_fd = -1;
        fprintf(stderr, "usage: ctrmon --version | ctrmon create ... | ctrmon exec ... | "
                "ctrmon pause\n");
        return 2;
    }
    parse_args(argc, argv);
    if (fcntl(opt.sync_fd, F_SETFD, FD_CLOEXEC) < 0)  /* runc and the container never see it */
        opt.sync_fd = -1;
    if (chdir(opt.bundle) < 0)
        fail("bundle %s: %s", opt.bundle, strerror(errno));
    for (int i = 0; i < MAX_CONNS; i++)
        conns[i] = (struct conn){.fd = -1, .kind = CONN_FREE};
    daemonize();

    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    sig_fd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sig_fd < 0)
        fail("signalfd: %s", strerror(errno));

    log_fd = open_log();
    if (log_fd < 0)
        fail("cannot open container log %s: %s", opt.log_path, strerror(errno));
    ctl_fd = listen_unix("ctl", SOCK_SEQPACKET);
    if (ctl_fd < 0)
        fail("control socket %s/ctl: %s", opt.bundle, strerror(errno));

    int in = -1, out[2] = {-1, -1}, err[2] = {-1, -1}, inp[2] = {-1, -1};
    if (!opt.tty) {
        big_pipe(out);
        big_pipe(err);
        out_fd[0] = out[0];
        out_fd[1] = err[0];
        if (opt.stdin_) {
            big_pipe(inp);
            in = inp[0];
            stdin_fd = inp[1];
        } else {
            in = open("/dev/null", O_RDONLY | O_CLOEXEC);
        }
    } else {
        /* runc gets /dev/null: the container's stdio is the pty it makes */
        in = open("/dev/null", O_RDWR | O_CLOEXEC);
        out[1] = err[1] = in;
    }
    pid_t init = runc_create(in, out[1], err[1]);
    close(in);
    if (!opt.tty) {
        close(out[1]);
        close(err[1]);
    } else {
        stdin_fd = opt.stdin_ ? out_fd[0] : -1;  /* the pty master is both ways */
    }
    for (int s = 0; s < 2; s++) {
        if (out_fd[s] >= 0)
            fcntl(out_fd[s], F_SETFL, fcntl(out_fd[s], F_GETFL) | O_NONBLOCK);
    }
    if (stdin_fd >= 0)
        fcntl(stdin_fd, F_SETFL, fcntl(stdin_fd, F_GETFL) | O_NONBLOCK);
    char ok[64];
    snprintf(ok, sizeof ok, "{\"pid\":%d}\n", init);
    sync_report(ok);
    run(init);
    return 0;
}
