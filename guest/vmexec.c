/*
 * vmexec: start one process inside a running container of the guest, the way `runc exec` would,
 * without runc's cost (~0.28 s per exec under TCG: the Go runtime starts twice). The agent plans
 * everything (which namespaces, user, capabilities, rlimits, seccomp filter) and spawns this
 * static binary with the process's stdio on 0/1/2 and its environment as our own; we only apply.
 *
 *   vmexec exec [options] -- ARGV...
 *     --cgroup FD           the container's cgroup directory: the process starts in it
 *     --oom-score-adj N
 *     --ns FD               setns(FD) (repeatable, applied in order; the agent puts mnt last)
 *     --report FD           records for the agent: "P" + int32 pid of the process, and
 *                           "E" + uint16 length + text when it could not be started
 *     --tty                 new session with fd 0 (a pty slave) as controlling terminal
 *     --rlimit RES:SOFT:HARD
 *     --bounding HEX --effective HEX --permitted HEX --inheritable HEX   (64-bit cap sets)
 *     --ambient N           raise capability N in the ambient set (repeatable)
 *     --uid N --gid N --groups N,N,...
 *     --no-new-privs
 *     --seccomp FD:FLAGS    a compiled filter (struct sock_filter[]) to load from FD
 *     --cwd PATH
 *   vmexec fixed-addresses -- ARGV...
 *     exec ARGV with address space randomisation off (ADDR_NO_RANDOMIZE). Under TCG, QEMU 7.2
 *     finds translated code by virtual address: a PIE program (crun and its libraries) placed
 *     anew by every exec is translated anew by every exec, ~0.3 s for crun. The agent runs its
 *     OCI runtime through this; the runtime resets the container's personality (the agent puts
 *     linux.personality in the spec), so workloads keep their randomisation.
 *   vmexec pid1
 *     PID 1 of a new PID namespace (the pod's shared one), which only reaps orphans: we unshare
 *     it and fork that PID 1, then wait for it as `unshare -f` does. One static process where
 *     a Python reaper cost an interpreter's start-up, ~0.1 s of the guest's vCPU under TCG,
 *     taken from the pod's first container.
 *   vmexec seccomp-compile < RULES > FILTER
 *     RULES, a line each: "default ACTION ERRNO", "arch NAME",
 *     "rule ACTION ERRNO SYSCALL [INDEX OP VALUE VALUE2]..." (ACTION and OP are libseccomp's
 *     numeric values, unknown syscall names are skipped as runc does).
 *
 * exec clones once after joining the namespaces (a PID namespace applies to children only),
 * straight into the container's cgroup (CLONE_INTO_CGROUP: migrating a running process costs
 * ~7 ms under TCG) and as a child of the agent (CLONE_PARENT: the agent reaps the process
 * itself, and we exit as soon as it is reported). Every fd but 0, 1 and 2 is closed when the
 * process execs, whatever the agent left inheritable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/close_range.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_NS 8
#define MAX_RLIMITS 20
#define MAX_AMBIENT 64
#define MAX_GROUPS 256

struct plan {
	int cgroup_fd, report_fd, seccomp_fd, n_ns, n_rlimits, n_ambient, n_groups;
	int ns_fds[MAX_NS];
	struct { int resource; struct rlimit limit; } rlimits[MAX_RLIMITS];
	int ambient[MAX_AMBIENT];
	gid_t groups[MAX_GROUPS];
	uint64_t bounding, effective, permitted, inheritable;
	unsigned int seccomp_flags;
	long oom_score_adj;
	int has_oom, tty, no_new_privs, has_caps;
	uid_t uid;
	gid_t gid;
	const char *cwd;
	char **argv;
};

static int report_fd = -1;

/* Tell the agent why the process could not start, then give up. */
static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
	char text[1024];
	unsigned char rec[3 + sizeof text];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(text, sizeof text, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n >= (int)sizeof text)
		n = sizeof text - 1;
	if (report_fd >= 0) {
		rec[0] = 'E';
		rec[1] = n & 0xff;
		rec[2] = (n >> 8) & 0xff;
		memcpy(rec + 3, text, n);
		(void)!write(report_fd, rec, 3 + n);
	} else {
		fprintf(stderr, "vmexec: %.*s\n", n, text);
	}
	_exit(127);
}

static long number(const char *s, const char *what)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end)
		fail("bad %s %s", what, s);
	return v;
}

static uint64_t hex64(const char *s, const char *what)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 16);
	if (errno || end == s || *end)
		fail("bad %s %s", what, s);
	return v;
}

static rlim_t rlim(const char *s, char **end)
{
	/* The agent writes RLIM_INFINITY as its decimal value. */
	errno = 0;
	return strtoull(s, end, 10);
}

static void parse(int argc, char **argv, struct plan *p)
{
	int i;

	memset(p, 0, sizeof *p);
	p->cgroup_fd = p->report_fd = p->seccomp_fd = -1;
	for (i = 2; i < argc; i++) {
		const char *opt = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(opt, "--")) {
			p->argv = argv + i + 1;
			break;
		}
		if (!strcmp(opt, "--tty")) {
			p->tty = 1;
			continue;
		}
		if (!strcmp(opt, "--no-new-privs")) {
			p->no_new_privs = 1;
			continue;
		}
		if (!val)
			fail("option %s needs a value", opt);
		i++;
		if (!strcmp(opt, "--report")) {
			p->report_fd = report_fd = number(val, "fd");
		} else if (!strcmp(opt, "--cgroup")) {
			p->cgroup_fd = number(val, "fd");
		} else if (!strcmp(opt, "--ns")) {
			if (p->n_ns == MAX_NS)
				fail("too many namespaces");
			p->ns_fds[p->n_ns++] = number(val, "fd");
		} else if (!strcmp(opt, "--oom-score-adj")) {
			p->oom_score_adj = number(val, "oom_score_adj");
			p->has_oom = 1;
		} else if (!strcmp(opt, "--rlimit")) {
			char *end;

			if (p->n_rlimits == MAX_RLIMITS)
				fail("too many rlimits");
			p->rlimits[p->n_rlimits].resource = strtol(val, &end, 10);
			if (*end != ':')
				fail("bad rlimit %s", val);
			p->rlimits[p->n_rlimits].limit.rlim_cur = rlim(end + 1, &end);
			if (*end != ':' || errno)
				fail("bad rlimit %s", val);
			p->rlimits[p->n_rlimits].limit.rlim_max = rlim(end + 1, &end);
			if (*end || errno)
				fail("bad rlimit %s", val);
			p->n_rlimits++;
		} else if (!strcmp(opt, "--bounding")) {
			p->bounding = hex64(val, "capability set");
			p->has_caps = 1;
		} else if (!strcmp(opt, "--effective")) {
			p->effective = hex64(val, "capability set");
		} else if (!strcmp(opt, "--permitted")) {
			p->permitted = hex64(val, "capability set");
		} else if (!strcmp(opt, "--inheritable")) {
			p->inheritable = hex64(val, "capability set");
		} else if (!strcmp(opt, "--ambient")) {
			if (p->n_ambient == MAX_AMBIENT)
				fail("too many ambient capabilities");
			p->ambient[p->n_ambient++] = number(val, "capability");
		} else if (!strcmp(opt, "--uid")) {
			p->uid = number(val, "uid");
		} else if (!strcmp(opt, "--gid")) {
			p->gid = number(val, "gid");
		} else if (!strcmp(opt, "--groups")) {
			char *copy = strdup(val), *save = NULL, *tok;

			for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
				if (p->n_groups == MAX_GROUPS)
					fail("too many groups");
				p->groups[p->n_groups++] = number(tok, "gid");
			}
			free(copy);
		} else if (!strcmp(opt, "--seccomp")) {
			char *end;

			p->seccomp_fd = strtol(val, &end, 10);
			if (*end != ':')
				fail("bad seccomp %s", val);
			p->seccomp_flags = strtoul(end + 1, &end, 10);
			if (*end)
				fail("bad seccomp %s", val);
		} else if (!strcmp(opt, "--cwd")) {
			p->cwd = val;
		} else {
			fail("unknown option %s", opt);
		}
	}
	if (!p->argv || !p->argv[0])
		fail("no command");
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);

	if (fd < 0 || write(fd, text, strlen(text)) < 0)
		fail("%s: %s", path, strerror(errno));
	close(fd);
}

/* The agent's signal plumbing (blocked or ignored signals) must not leak into the process. */
static void reset_signals(void)
{
	sigset_t none;
	int sig;

	for (sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static void load_seccomp(const struct plan *p)
{
	struct stat st;
	struct sock_fprog prog;
	void *buf;

	if (fstat(p->seccomp_fd, &st) < 0 || st.st_size <= 0 ||
	    st.st_size % sizeof(struct sock_filter))
		fail("seccomp filter: bad size");
	buf = malloc(st.st_size);
	if (!buf || pread(p->seccomp_fd, buf, st.st_size, 0) != st.st_size)
		fail("seccomp filter: cannot read");
	prog.len = st.st_size / sizeof(struct sock_filter);
	prog.filter = buf;
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, p->seccomp_flags, &prog) < 0)
		fail("seccomp: %s", strerror(errno));
	free(buf);
}

static void set_caps(const struct plan *p)
{
	struct __user_cap_header_struct head = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2] = {
		{ (uint32_t)p->effective, (uint32_t)p->permitted, (uint32_t)p->inheritable },
		{ p->effective >> 32, p->permitted >> 32, p->inheritable >> 32 },
	};
	int i;

	if (syscall(SYS_capset, &head, data) < 0)
		fail("capset: %s", strerror(errno));
	for (i = 0; i < p->n_ambient; i++)
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, p->ambient[i], 0, 0) < 0)
			fail("ambient capability %d: %s", p->ambient[i], strerror(errno));
}

/* In the process-to-be, inside every namespace: what runc's init does after setns, in its order. */
static void __attribute__((noreturn)) become(const struct plan *p)
{
	int cap, i;

	reset_signals();
	if (p->tty) {
		if (setsid() < 0 || ioctl(0, TIOCSCTTY, 0) < 0)
			fail("controlling terminal: %s", strerror(errno));
	}
	for (i = 0; i < p->n_rlimits; i++)
		if (setrlimit(p->rlimits[i].resource, &p->rlimits[i].limit) < 0)
			fail("rlimit %d: %s", p->rlimits[i].resource, strerror(errno));
	if (p->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		fail("no_new_privs: %s", strerror(errno));
	/* Without no_new_privs the filter must go in while we still hold CAP_SYS_ADMIN. */
	if (p->seccomp_fd >= 0 && !p->no_new_privs)
		load_seccomp(p);
	if (p->has_caps) {
		if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
			fail("keepcaps: %s", strerror(errno));
		/* Up to the kernel's last capability: CAPBSET_READ fails past it. */
		for (cap = 0; cap < 64 && prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
			if (!(p->bounding >> cap & 1) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
				fail("bounding set: %s", strerror(errno));
	}
	if (setgroups(p->n_groups, p->groups) < 0)
		fail("setgroups: %s", strerror(errno));
	if (setresgid(p->gid, p->gid, p->gid) < 0)
		fail("setgid %u: %s", p->gid, strerror(errno));
	if (setresuid(p->uid, p->uid, p->uid) < 0)
		fail("setuid %u: %s", p->uid, strerror(errno));
	if (p->has_caps)
		set_caps(p);
	if (p->cwd && chdir(p->cwd) < 0)
		fail("cwd %s: %s", p->cwd, strerror(errno));
	if (p->seccomp_fd >= 0 && p->no_new_privs)
		load_seccomp(p);
	execvp(p->argv[0], p->argv);
	fail("exec %s: %s", p->argv[0], strerror(errno));
}

/* The process-to-be: a sibling of ours (our parent waits for it), in the cgroup behind
 * `cgroup_fd` (a directory) when given. */
static pid_t clone_sibling(int cgroup_fd)
{
	struct clone_args args = { .flags = CLONE_PARENT };

	if (cgroup_fd >= 0) {
		args.flags |= CLONE_INTO_CGROUP;
		args.cgroup = cgroup_fd;
	}
	/* No CLONE_VM and no new stack: the child continues here on a copy, like fork(). */
	return syscall(SYS_clone3, &args, sizeof args);
}

static int cmd_exec(int argc, char **argv)
{
	struct plan p;
	unsigned char rec[5];
	int i;
	pid_t pid;
	char text[32];

	parse(argc, argv, &p);
	/* Nothing of ours reaches the process; the report's end-of-file in particular is how the
	 * agent learns that the process has started. */
	if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
		fail("close_range: %s", strerror(errno));
	if (p.has_oom) {
		snprintf(text, sizeof text, "%ld", p.oom_score_adj);
		write_file("/proc/self/oom_score_adj", text);
	}
	for (i = 0; i < p.n_ns; i++)
		if (setns(p.ns_fds[i], 0) < 0)
			fail("setns: %s", strerror(errno));
	for (i = 0; i < p.n_ns; i++)
		close(p.ns_fds[i]);
	pid = clone_sibling(p.cgroup_fd);
	if (pid < 0)
		fail("clone: %s", strerror(errno));
	if (pid == 0)
		become(&p);
	if (p.report_fd >= 0) {
		rec[0] = 'P';
		memcpy(rec + 1, &(int32_t){ pid }, 4);
		if (write(p.report_fd, rec, sizeof rec) != sizeof rec)
			return 127;
	}
	return 0;
}

/* seccomp-compile: the agent's rule lines -> a raw BPF program, compiled once per container. */
static int cmd_seccomp_compile(void)
{
	char line[4096];
	scmp_filter_ctx ctx = NULL;
	int lineno = 0, rc;

	while (fgets(line, sizeof line, stdin)) {
		char *words[4 + 6 * 4], *save = NULL, *tok;
		int n = 0;

		lineno++;
		for (tok = strtok_r(line, " \n", &save); tok && n < (int)(sizeof words / sizeof *words);
		     tok = strtok_r(NULL, " \n", &save))
			words[n++] = tok;
		if (n == 0)
			continue;
		if (!strcmp(words[0], "default") && n == 3) {
			uint32_t act = strtoul(words[1], NULL, 10);

			if (act == SCMP_ACT_ERRNO(0))
				act = SCMP_ACT_ERRNO(atoi(words[2]));
			ctx = seccomp_init(act);
			if (!ctx)
				fail("line %d: bad default action", lineno);
			/* The agent sets no_new_privs itself, when the spec asks for it. */
			seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
		} else if (!ctx) {
			fail("line %d: the first line must be the default action", lineno);
		} else if (!strcmp(words[0], "arch") && n == 2) {
			uint32_t arch = seccomp_arch_resolve_name(words[1]);

			if (!arch)
				fail("line %d: unknown architecture %s", lineno, words[1]);
			rc = seccomp_arch_add(ctx, arch);
			if (rc < 0 && rc != -EEXIST)
				fail("line %d: arch %s: %s", lineno, words[1], strerror(-rc));
		} else if (!strcmp(words[0], "rule") && n >= 4 && (n - 4) % 4 == 0) {
			struct scmp_arg_cmp args[6];
			uint32_t act = strtoul(words[1], NULL, 10);
			int nr = seccomp_syscall_resolve_name(words[3]), i, nargs = (n - 4) / 4;

			if (nr == __NR_SCMP_ERROR)
				continue; /* unknown to libseccomp: runc skips it too */
			if (nargs > 6)
				fail("line %d: too many argument conditions", lineno);
			if (act == SCMP_ACT_ERRNO(0) || act == SCMP_ACT_TRACE(0))
				act |= strtoul(words[2], NULL, 10) & 0xffff;
			for (i = 0; i < nargs; i++) {
				args[i].arg = strtoul(words[4 + 4 * i], NULL, 10);
				args[i].op = strtoul(words[5 + 4 * i], NULL, 10);
				args[i].datum_a = strtoull(words[6 + 4 * i], NULL, 10);
				args[i].datum_b = strtoull(words[7 + 4 * i], NULL, 10);
			}
			rc = seccomp_rule_add_array(ctx, act, nr, nargs, args);
			if (rc < 0)
				fail("line %d: rule for %s: %s", lineno, words[3], strerror(-rc));
		} else {
			fail("line %d: cannot parse", lineno);
		}
	}
	if (!ctx)
		fail("no default action");
	rc = seccomp_export_bpf(ctx, 1);
	if (rc < 0)
		fail("export: %s", strerror(-rc));
	seccomp_release(ctx);
	return 0;
}

static int cmd_pid1(void)
{
	sigset_t wait_for;
	pid_t child;
	int status;

	/* Before the fork: the namespace's init ignores what it does not handle, and it handles
	 * nothing, but a signal sent to it before it was blocked would still kill it. */
	sigemptyset(&wait_for);
	sigaddset(&wait_for, SIGCHLD);
	sigaddset(&wait_for, SIGTERM);
	sigaddset(&wait_for, SIGINT);
	if (sigprocmask(SIG_BLOCK, &wait_for, NULL) < 0 || unshare(CLONE_NEWPID) < 0) {
		fprintf(stderr, "vmexec: pid namespace: %s\n", strerror(errno));
		return 126;
	}
	child = fork();
	if (child < 0) {
		fprintf(stderr, "vmexec: fork: %s\n", strerror(errno));
		return 126;
	}
	if (child > 0) {
		while (waitpid(child, &status, 0) < 0)
			if (errno != EINTR)
				return 126;
		return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	}
	for (;;) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		sigwaitinfo(&wait_for, NULL);
	}
}

static int cmd_fixed_addresses(int argc, char **argv)
{
	if (argc < 4 || strcmp(argv[2], "--")) {
		fprintf(stderr, "usage: vmexec fixed-addresses -- ARGV...\n");
		return 2;
	}
	int current = personality(0xffffffff);
	if (current == -1 || personality((unsigned long)current | ADDR_NO_RANDOMIZE) == -1) {
		fprintf(stderr, "vmexec: personality: %s\n", strerror(errno));
		return 126;
	}
	execv(argv[3], argv + 3);
	fprintf(stderr, "vmexec: exec %s: %s\n", argv[3], strerror(errno));
	return 127;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "exec"))
		return cmd_exec(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "fixed-addresses"))
		return cmd_fixed_addresses(argc, argv);
	if (argc == 2 && !strcmp(argv[1], "seccomp-compile"))
		return cmd_seccomp_compile();
	if (argc == 2 && !strcmp(argv[1], "pid1"))
		return cmd_pid1();
	fprintf(stderr, "usage: vmexec exec [options] -- ARGV... | vmexec fixed-addresses -- ARGV..."
		" | vmexec pid1 | vmexec seccomp-compile\n");
	return 2;
}
