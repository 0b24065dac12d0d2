/*
 * vmwork: the lab guest's workloads, one multi-call tool (see README.md beside this file).
 *
 * Each workload leaves the guest's memory in a known state (page cache, mapped files, anonymous memory, tmpfs,
 * non-zero free pages, memory being rewritten during a migration) and registers what it wrote in a state
 * folder, so that `verify` can re-check every byte later, e.g. on the destination of a live migration. Memory
 * held by a process (anon, map, dirty) is checked through /proc/PID/mem, as the guest sees it.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pattern.h"

#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / 8)
#define IO_CHUNK (1u << 20)

static const char *state_dir(void) {
    const char *d = getenv("VMWORK_STATE_DIR");
    return d && *d ? d : "/run/vmwork";
}

static _Noreturn void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("vmwork: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static uint64_t parse_size(const char *s) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s) die("not a size: '%s' (use e.g. 64M)", s);
    switch (*end) {
    case 'K': case 'k': v <<= 10; end++; break;
    case 'M': case 'm': v <<= 20; end++; break;
    case 'G': case 'g': v <<= 30; end++; break;
    default: break;
    }
    if (*end) die("not a size: '%s' (use e.g. 64M)", s);
    return v;
}

static uint64_t random_seed(void) {
    uint64_t s = 0;
    if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s) s = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    return s;
}

/* ---- registrations: <state>/<kind>-<pid>-<n>.reg, key=value lines, written atomically ---- */

struct reg {
    char kind[16], path[512];
    long pid;
    uint64_t addr, size, seed;
};

static void reg_write(const struct reg *r) {
    static int counter;
    char tmp[800], final[768];
    mkdir(state_dir(), 0755);
    snprintf(final, sizeof final, "%s/%s-%d-%d.reg", state_dir(), r->kind, getpid(), counter++);
    snprintf(tmp, sizeof tmp, "%s.tmp", final);
    FILE *f = fopen(tmp, "w");
    if (!f) die("cannot write %s: %s", tmp, strerror(errno));
    fprintf(f, "kind=%s\npid=%ld\npath=%s\naddr=%" PRIu64 "\nsize=%" PRIu64 "\nseed=%" PRIu64 "\n", r->kind, r->pid,
            r->path, r->addr, r->size, r->seed);
    if (fclose(f) != 0 || rename(tmp, final) != 0) die("cannot write %s: %s", final, strerror(errno));
}

static int reg_read(const char *file, struct reg *r) {
    FILE *f = fopen(file, "r");
    char line[640];
    if (!f) return -1;
    memset(r, 0, sizeof *r);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        const char *v = eq + 1;
        if (!strcmp(line, "kind")) snprintf(r->kind, sizeof r->kind, "%s", v);
        else if (!strcmp(line, "path")) snprintf(r->path, sizeof r->path, "%s", v);
        else if (!strcmp(line, "pid")) r->pid = strtol(v, NULL, 10);
        else if (!strcmp(line, "addr")) r->addr = strtoull(v, NULL, 10);
        else if (!strcmp(line, "size")) r->size = strtoull(v, NULL, 10);
        else if (!strcmp(line, "seed")) r->seed = strtoull(v, NULL, 10);
    }
    fclose(f);
    return r->kind[0] ? 0 : -1;
}

/* Calls fn for every registration (sorted by file name for a stable order); returns the first non-zero result. */
static int reg_each(int (*fn)(const char *file, const struct reg *r, void *ctx), void *ctx) {
    struct dirent **names;
    int n = scandir(state_dir(), &names, NULL, alphasort), rc = 0;
    if (n < 0) return 0;
    for (int i = 0; i < n; i++) {
        char file[768];
        struct reg r;
        size_t len = strlen(names[i]->d_name);
        if (!rc && len > 4 && !strcmp(names[i]->d_name + len - 4, ".reg")) {
            snprintf(file, sizeof file, "%s/%s", state_dir(), names[i]->d_name);
            if (reg_read(file, &r) == 0) rc = fn(file, &r, ctx);
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

/* ---- keepers: daemons that hold memory; the command returns once the keeper has filled it ---- */

static int ready_fd = -1;

/* Forks a daemon running `body`; the parent prints what the keeper reported and exits with its verdict. */
static void start_keeper(void (*body)(void *), void *arg) {
    int p[2];
    if (pipe(p) < 0) die("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) die("fork: %s", strerror(errno));
    if (pid == 0) {
        close(p[0]);
        setsid();
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        ready_fd = p[1];
        body(arg);
        _exit(0);
    }
    close(p[1]);
    char msg[4096];
    size_t len = 0;
    ssize_t r;
    while (len < sizeof msg - 1 && (r = read(p[0], msg + len, sizeof msg - 1 - len)) != 0) {
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) break;
        len += (size_t)r;
    }
    msg[len] = 0;
    if (strncmp(msg, "ok ", 3) == 0) {
        printf("%s\n", msg + 3);
        exit(0);
    }
    fprintf(stderr, "vmwork: keeper failed: %s\n", len ? msg : "(no report)");
    kill(pid, SIGKILL);
    exit(1);
}

static void keeper_report(const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (write(ready_fd, msg, (size_t)n) < 0) _exit(1);
    close(ready_fd);
    ready_fd = -1;
}

static _Noreturn void keeper_fail(const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    keeper_report("err %s", msg);
    _exit(1);
}

static _Noreturn void keep_forever(void) {
    for (;;) pause();
}

/* ---- file content ---- */

/* Reads `path` and checks it against its pattern; returns -1 if fine, else the first bad byte offset. */
static int64_t check_file(const char *path, uint64_t seed, uint64_t *expected, uint64_t *got, uint64_t *bytes) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    uint64_t *buf = malloc(IO_CHUNK);
    uint64_t off = 0;
    ssize_t r;
    while ((r = read(fd, buf, IO_CHUNK)) > 0) {
        size_t words = (size_t)r / 8, bad = pattern_check(buf, words, seed, off / 8);
        if (bad < words) {
            *expected = splitmix64(seed + off / 8 + bad);
            *got = buf[bad];
            close(fd);
            free(buf);
            return (int64_t)(off + bad * 8);
        }
        off += (uint64_t)r;
    }
    if (r < 0) die("read %s: %s", path, strerror(errno));
    close(fd);
    free(buf);
    *bytes = off;
    return -1;
}

static void write_pattern_file(const char *path, uint64_t size, uint64_t seed) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("cannot create %s: %s", path, strerror(errno));
    uint64_t *buf = malloc(IO_CHUNK);
    for (uint64_t off = 0; off < size; off += IO_CHUNK) {
        size_t n = size - off < IO_CHUNK ? (size_t)(size - off) : IO_CHUNK;
        pattern_fill(buf, (n + 7) / 8, seed, off / 8);
        if (write(fd, buf, n) != (ssize_t)n) die("write %s: %s", path, strerror(errno));
    }
    free(buf);
    if (close(fd) != 0) die("close %s: %s", path, strerror(errno));
}

static int cmd_gen(int argc, char **argv) {
    if (argc != 2) die("usage: vmwork gen FILE SIZE");
    write_pattern_file(argv[0], parse_size(argv[1]), fnv1a64(base_name(argv[0])));
    return 0;
}

static int cmd_fill_cache(int argc, char **argv) {
    uint64_t total = 0;
    for (int i = 0; i < argc; i++) {
        uint64_t e, g, bytes = 0;
        int64_t bad = check_file(argv[i], fnv1a64(base_name(argv[i])), &e, &g, &bytes);
        if (bad >= 0) die("%s: content differs at offset %" PRId64 ": expected 0x%" PRIx64 " got 0x%" PRIx64, argv[i], bad, e, g);
        struct reg r = {.pid = 0, .size = bytes, .seed = fnv1a64(base_name(argv[i]))};
        snprintf(r.kind, sizeof r.kind, "file");
        snprintf(r.path, sizeof r.path, "%s", argv[i]);
        reg_write(&r);
        total += bytes;
    }
    printf("fill-cache files=%d bytes=%" PRIu64 "\n", argc, total);
    return 0;
}

struct files_arg {
    int argc;
    char **argv;
};

static void map_files_body(void *p) {
    struct files_arg *a = p;
    uint64_t total = 0;
    for (int i = 0; i < a->argc; i++) {
        const char *path = a->argv[i];
        int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) keeper_fail("cannot open %s: %s", path, strerror(errno));
        uint64_t *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) keeper_fail("mmap %s: %s", path, strerror(errno));
        uint64_t seed = fnv1a64(base_name(path));
        size_t words = (size_t)st.st_size / 8, bad = pattern_check(m, words, seed, 0);
        if (bad < words) keeper_fail("%s: content differs at offset %zu", path, bad * 8);
        struct reg r = {.pid = getpid(), .addr = (uint64_t)(uintptr_t)m, .size = (uint64_t)st.st_size, .seed = seed};
        snprintf(r.kind, sizeof r.kind, "map");
        snprintf(r.path, sizeof r.path, "%s", path);
        reg_write(&r);
        total += (uint64_t)st.st_size;
    }
    keeper_report("ok map-files pid=%d files=%d bytes=%" PRIu64, getpid(), a->argc, total);
    keep_forever();
}

static int cmd_map_files(int argc, char **argv) {
    if (argc < 1) die("usage: vmwork map-files FILE...");
    struct files_arg a = {argc, argv};
    start_keeper(map_files_body, &a);
    return 0;
}

static int cmd_dirty_files(int argc, char **argv) {
    if (argc < 2 || argc > 3) die("usage: vmwork dirty-files DIR SIZE [COUNT]");
    uint64_t size = parse_size(argv[1]), nonce = random_seed();
    int count = argc == 3 ? atoi(argv[2]) : 4;
    mkdir(argv[0], 0755);
    for (int i = 0; i < count; i++) {
        struct reg r = {.size = size};
        snprintf(r.kind, sizeof r.kind, "dirtyfile");
        snprintf(r.path, sizeof r.path, "%s/dirty-%" PRIx64 "-%d", argv[0], nonce & 0xffffff, i);
        r.seed = fnv1a64(base_name(r.path)) ^ nonce;
        write_pattern_file(r.path, size, r.seed); /* no fsync: the pages stay dirty until writeback */
        reg_write(&r);
    }
    printf("dirty-files dir=%s count=%d size=%" PRIu64 "\n", argv[0], count, size);
    return 0;
}

static int cmd_tmpfs(int argc, char **argv) {
    if (argc < 1 || argc > 2) die("usage: vmwork tmpfs SIZE [DIR]");
    struct reg r = {.size = parse_size(argv[0]), .seed = random_seed()};
    snprintf(r.kind, sizeof r.kind, "tmpfs");
    snprintf(r.path, sizeof r.path, "%s/vmwork-%" PRIx64, argc == 2 ? argv[1] : "/dev/shm", r.seed & 0xffffff);
    write_pattern_file(r.path, r.size, r.seed);
    reg_write(&r);
    printf("tmpfs path=%s size=%" PRIu64 "\n", r.path, r.size);
    return 0;
}

/* ---- anonymous memory ---- */

static void *map_anon(uint64_t size) {
    void *m = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return m == MAP_FAILED ? NULL : m;
}

static void anon_body(void *p) {
    uint64_t size = *(uint64_t *)p, seed = random_seed();
    uint64_t *m = map_anon(size);
    if (!m) keeper_fail("cannot map %" PRIu64 " bytes: %s", size, strerror(errno));
    pattern_fill(m, (size_t)(size / 8), seed, 0);
    struct reg r = {.pid = getpid(), .addr = (uint64_t)(uintptr_t)m, .size = size, .seed = seed};
    snprintf(r.kind, sizeof r.kind, "anon");
    reg_write(&r);
    keeper_report("ok anon pid=%d addr=0x%" PRIx64 " size=%" PRIu64, getpid(), r.addr, size);
    keep_forever();
}

static int cmd_anon(int argc, char **argv) {
    if (argc != 1) die("usage: vmwork anon SIZE");
    uint64_t size = parse_size(argv[0]) / PAGE * PAGE;
    start_keeper(anon_body, &size);
    return 0;
}

static void churn_once(uint64_t size, uint64_t round) {
    uint64_t *m = map_anon(size);
    if (!m) die("cannot map %" PRIu64 " bytes: %s", size, strerror(errno));
    pattern_fill(m, (size_t)(size / 8), random_seed(), round);
    munmap(m, (size_t)size);
}

static void churn_body(void *p) {
    uint64_t size = *(uint64_t *)p;
    struct reg r = {.pid = getpid(), .size = size};
    snprintf(r.kind, sizeof r.kind, "churn");
    reg_write(&r);
    keeper_report("ok churn pid=%d size=%" PRIu64 " loops=forever", getpid(), size);
    for (uint64_t round = 0;; round++) churn_once(size, round);
}

static int cmd_churn(int argc, char **argv) {
    if (argc < 1 || argc > 2) die("usage: vmwork churn SIZE [LOOPS] (LOOPS 0: forever, in the background)");
    uint64_t size = parse_size(argv[0]) / PAGE * PAGE;
    long loops = argc == 2 ? strtol(argv[1], NULL, 10) : 1;
    if (loops == 0) start_keeper(churn_body, &size);
    for (long i = 0; i < loops; i++) churn_once(size, (uint64_t)i);
    printf("churn size=%" PRIu64 " loops=%ld\n", size, loops);
    return 0;
}

/* ---- dirty: rewrite anonymous memory at a rate, each page self-describing ---- */

/*
 * Page `index` at generation `gen`: word0 = index (bit 63: sparse), word1 = gen, the rest derived from the
 * index and, unless sparse, the generation. A sparse generation changes only word 1: a small delta, as XBZRLE
 * likes it; a dense one rewrites the whole page.
 */
#define DIRTY_SPARSE (1ull << 63)
static void dirty_fill(uint64_t *page, uint64_t seed, uint64_t index, uint64_t gen, int sparse) {
    page[0] = index | (sparse ? DIRTY_SPARSE : 0);
    page[1] = gen;
    pattern_fill(page + 2, WORDS_PER_PAGE - 2, seed ^ (index << 20) ^ (sparse ? 0 : gen << 44), 0);
}

/* Index of the first bad word of a dirty page, or WORDS_PER_PAGE if it is consistent. */
static size_t dirty_check(const uint64_t *page, uint64_t seed, uint64_t index) {
    if ((page[0] & ~DIRTY_SPARSE) != index) return 0;
    int sparse = (page[0] & DIRTY_SPARSE) != 0;
    size_t bad = pattern_check(page + 2, WORDS_PER_PAGE - 2, seed ^ (index << 20) ^ (sparse ? 0 : page[1] << 44), 0);
    return bad < WORDS_PER_PAGE - 2 ? bad + 2 : WORDS_PER_PAGE;
}

struct dirty_arg {
    uint64_t rate, size;
    int sparse;
};

static void dirty_body(void *p) {
    struct dirty_arg *a = p;
    uint64_t seed = random_seed(), pages = a->size / PAGE;
    uint64_t *m = map_anon(a->size);
    if (!m) keeper_fail("cannot map %" PRIu64 " bytes: %s", a->size, strerror(errno));
    for (uint64_t i = 0; i < pages; i++) dirty_fill(m + i * WORDS_PER_PAGE, seed, i, 0, a->sparse);
    struct reg r = {.pid = getpid(), .addr = (uint64_t)(uintptr_t)m, .size = a->size, .seed = seed};
    snprintf(r.kind, sizeof r.kind, "dirty");
    reg_write(&r);
    keeper_report("ok dirty pid=%d addr=0x%" PRIx64 " size=%" PRIu64 " rate=%" PRIu64 "/s", getpid(), r.addr, a->size, a->rate);
    /* Batches of 16 pages, paced so that `rate` bytes are written per second. */
    const uint64_t batch = 16;
    const double batch_ns = a->rate ? 1e9 * (double)(batch * PAGE) / (double)a->rate : 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t gen = 1;; gen++) {
        for (uint64_t i = 0; i < pages; i++) {
            uint64_t *page = m + i * WORDS_PER_PAGE;
            size_t bad = dirty_check(page, seed, i);
            if (bad < WORDS_PER_PAGE || page[1] != gen - 1) {
                char fail[768];
                snprintf(fail, sizeof fail, "%s/dirty-%d.fail", state_dir(), getpid());
                FILE *f = fopen(fail, "a");
                if (f) {
                    fprintf(f, "page %" PRIu64 " (address 0x%" PRIx64 ") word %zu: generation %" PRIu64 " expected %" PRIu64 "\n", i,
                            (uint64_t)(uintptr_t)page, bad, page[1], gen - 1);
                    fclose(f);
                }
            }
            dirty_fill(page, seed, i, gen, a->sparse);
            if (batch_ns > 0 && (i + 1) % batch == 0) {
                uint64_t ns = (uint64_t)next.tv_nsec + (uint64_t)batch_ns;
                next.tv_sec += (time_t)(ns / 1000000000u);
                next.tv_nsec = (long)(ns % 1000000000u);
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
            }
        }
    }
}

static int cmd_dirty(int argc, char **argv) {
    if (argc < 1 || argc > 3 || (argc == 3 && strcmp(argv[2], "sparse"))) die("usage: vmwork dirty RATE [SIZE [sparse]]");
    struct dirty_arg a = {parse_size(argv[0]), argc >= 2 ? parse_size(argv[1]) / PAGE * PAGE : 64u << 20, argc == 3};
    start_keeper(dirty_body, &a);
    return 0;
}

/* ---- kpageflags: ground truth for introspection, dumped to a raw disk ---- */

/*
 * The dump streams through one small buffer: a dumper holding megabytes would free them when it exits, after the
 * dump and before the VM is paused, and those pages (free in the guest's view, then briefly allocated, then on a
 * per-CPU free list) would disagree with the dump for reasons of the dumper's own making.
 */
#define KPF_CHUNK (64u << 10)

/* Copies /proc/kpage* (st_size is 0: read until EOF, or up to `limit` bytes) to fd at `off`, KPF_CHUNK at a time;
 * the last chunk is zero-padded to a whole page for O_DIRECT. Returns the bytes copied. */
static uint64_t copy_proc_direct(const char *path, int fd, uint64_t off, uint64_t limit, uint8_t *buf) {
    int in = open(path, O_RDONLY);
    if (in < 0) die("cannot open %s: %s", path, strerror(errno));
    uint64_t copied = 0;
    int eof = 0;
    while (!eof && copied < limit) {
        size_t n = 0, want = KPF_CHUNK;
        if (limit - copied < want) want = (size_t)(limit - copied);
        memset(buf, 0, KPF_CHUNK);
        while (n < want) {
            ssize_t r = read(in, buf + n, want - n);
            if (r < 0) die("read %s: %s", path, strerror(errno));
            if (r == 0) { eof = 1; break; }
            n += (size_t)r;
        }
        if (n == 0) break;
        size_t padded = (n + PAGE - 1) / PAGE * PAGE;
        if (pwrite(fd, buf, padded, (off_t)(off + copied)) != (ssize_t)padded)
            die("write at %" PRIu64 ": %s (is the disk large enough?)", off + copied, strerror(errno));
        copied += n;
    }
    close(in);
    return copied;
}

static int cmd_kpageflags(int argc, char **argv) {
    if (argc != 1 && argc != 2) die("usage: vmwork kpageflags DEV [HOLD_SECONDS]");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint8_t *buf;
    if (posix_memalign((void **)&buf, PAGE, KPF_CHUNK) != 0) die("out of memory");
    int fd = open(argv[0], O_WRONLY | O_DIRECT);
    if (fd < 0) die("cannot open %s for O_DIRECT writing: %s", argv[0], strerror(errno));
    uint64_t flags_off = PAGE;
    uint64_t pfns = copy_proc_direct("/proc/kpageflags", fd, flags_off, UINT64_MAX, buf) / 8;
    uint64_t counts_off = flags_off + (pfns * 8 + PAGE - 1) / PAGE * PAGE;
    uint64_t counted = copy_proc_direct("/proc/kpagecount", fd, counts_off, pfns * 8, buf) / 8;
    if (counted < pfns) pfns = counted;
    memset(buf, 0, PAGE);
    uint64_t header[5] = {0, pfns, flags_off, counts_off, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec};
    memcpy(header, "VMPKPF01", 8);
    memcpy(buf, header, sizeof header);
    if (pwrite(fd, buf, PAGE, 0) != (ssize_t)PAGE) die("write header: %s", strerror(errno));
    if (fsync(fd) != 0 || close(fd) != 0) die("sync %s: %s", argv[0], strerror(errno));
    printf("kpageflags pfns=%" PRIu64 " bytes=%" PRIu64 "\n", pfns, counts_off + pfns * 8);
    fflush(stdout);
    /* HOLD_SECONDS: stay alive after the dump, so that a host watching the disk for the header pauses the guest
     * before this process exits and frees its kernel stack and page tables (pages the dump saw in use). */
    if (argc == 2) sleep((unsigned)strtoul(argv[1], NULL, 10));
    return 0;
}

/* ---- verify, status, stop ---- */

struct verify_ctx {
    int checks;
    uint64_t bytes;
};

static int alive(long pid) { return pid > 0 && kill((pid_t)pid, 0) == 0; }

static int fail_at(const struct reg *r, uint64_t off, uint64_t expected, uint64_t got) {
    printf("FAIL %s %s at offset %" PRIu64 " (address 0x%" PRIx64 "): expected 0x%016" PRIx64 " got 0x%016" PRIx64 "\n", r->kind,
           r->path[0] ? r->path : "-", off, r->addr + off, expected, got);
    return 1;
}

/* Checks process memory through /proc/PID/mem, one chunk at a time. */
static int verify_process_memory(const struct reg *r, struct verify_ctx *ctx) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/mem", r->pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        printf("FAIL %s pid %ld: process gone (%s)\n", r->kind, r->pid, strerror(errno));
        return 1;
    }
    uint64_t *buf = malloc(IO_CHUNK);
    int rc = 0;
    for (uint64_t off = 0; off < r->size && !rc;) {
        size_t n = r->size - off < IO_CHUNK ? (size_t)(r->size - off) : IO_CHUNK;
        if (pread(fd, buf, n, (off_t)(r->addr + off)) != (ssize_t)n) {
            printf("FAIL %s pid %ld: cannot read memory at 0x%" PRIx64 ": %s\n", r->kind, r->pid, r->addr + off, strerror(errno));
            rc = 1;
            break;
        }
        if (!strcmp(r->kind, "dirty")) {
            for (size_t p = 0; p < n / PAGE && !rc; p++) {
                uint64_t index = (off / PAGE) + p, *page = buf + p * WORDS_PER_PAGE;
                /* The writer may be halfway through this page: re-read it a few times before calling it bad. */
                for (int attempt = 0; attempt < 4 && dirty_check(page, r->seed, index) < WORDS_PER_PAGE; attempt++) {
                    usleep(1000);
                    if (pread(fd, page, PAGE, (off_t)(r->addr + off + p * PAGE)) != (ssize_t)PAGE) break;
                }
                size_t bad = dirty_check(page, r->seed, index);
                if (bad < WORDS_PER_PAGE) rc = fail_at(r, off + p * PAGE + bad * 8, bad == 0 ? index : 0, page[bad]);
            }
        } else {
            size_t bad = pattern_check(buf, n / 8, r->seed, off / 8);
            if (bad < n / 8) rc = fail_at(r, off + bad * 8, splitmix64(r->seed + off / 8 + bad), buf[bad]);
        }
        off += n;
    }
    free(buf);
    close(fd);
    ctx->bytes += r->size;
    return rc;
}

static int verify_one(const char *file, const struct reg *r, void *p) {
    struct verify_ctx *ctx = p;
    (void)file;
    ctx->checks++;
    if (!strcmp(r->kind, "file") || !strcmp(r->kind, "tmpfs") || !strcmp(r->kind, "dirtyfile")) {
        uint64_t e, g, bytes = 0;
        int64_t bad = check_file(r->path, r->seed, &e, &g, &bytes);
        if (bad >= 0) {
            struct reg at0 = *r;
            at0.addr = 0;
            return fail_at(&at0, (uint64_t)bad, e, g);
        }
        if (bytes != r->size) {
            printf("FAIL %s %s: %" PRIu64 " bytes, expected %" PRIu64 "\n", r->kind, r->path, bytes, r->size);
            return 1;
        }
        ctx->bytes += bytes;
        return 0;
    }
    if (!strcmp(r->kind, "anon") || !strcmp(r->kind, "map") || !strcmp(r->kind, "dirty")) {
        if (verify_process_memory(r, ctx)) return 1;
        if (!strcmp(r->kind, "dirty")) {
            char fail[768], line[512] = "";
            snprintf(fail, sizeof fail, "%s/dirty-%ld.fail", state_dir(), r->pid);
            FILE *f = fopen(fail, "r");
            if (f) {
                if (!fgets(line, sizeof line, f)) line[0] = 0;
                fclose(f);
                printf("FAIL dirty pid %ld saw a page change under it: %s", r->pid, line);
                return 1;
            }
        }
        return 0;
    }
    if (!strcmp(r->kind, "churn")) {
        if (!alive(r->pid)) {
            printf("FAIL churn pid %ld: process gone\n", r->pid);
            return 1;
        }
        return 0;
    }
    printf("FAIL unknown registration kind '%s' in %s\n", r->kind, file);
    return 1;
}

static int cmd_verify(void) {
    struct verify_ctx ctx = {0};
    if (reg_each(verify_one, &ctx)) return 1;
    printf("OK %d checks, %" PRIu64 " bytes\n", ctx.checks, ctx.bytes);
    return 0;
}

static int status_one(const char *file, const struct reg *r, void *p) {
    (void)p;
    printf("%s kind=%s pid=%ld path=%s addr=0x%" PRIx64 " size=%" PRIu64 "%s\n", file, r->kind, r->pid, r->path[0] ? r->path : "-",
           r->addr, r->size, r->pid && !alive(r->pid) ? " (gone)" : "");
    return 0;
}

static int stop_one(const char *file, const struct reg *r, void *p) {
    (void)p;
    if (r->pid > 0) {
        kill((pid_t)r->pid, SIGTERM);
        for (int i = 0; i < 100 && alive(r->pid); i++) usleep(10000);
        char fail[768];
        snprintf(fail, sizeof fail, "%s/dirty-%ld.fail", state_dir(), r->pid);
        unlink(fail);
        unlink(file);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr,
                "usage: vmwork gen|fill-cache|map-files|dirty-files|anon|tmpfs|churn|dirty|kpageflags|verify|status|stop ...\n");
        return 2;
    }
    const char *cmd = argv[1];
    int n = argc - 2;
    char **args = argv + 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(cmd, "gen")) return cmd_gen(n, args);
    if (!strcmp(cmd, "fill-cache")) return cmd_fill_cache(n, args);
    if (!strcmp(cmd, "map-files")) return cmd_map_files(n, args);
    if (!strcmp(cmd, "dirty-files")) return cmd_dirty_files(n, args);
    if (!strcmp(cmd, "anon")) return cmd_anon(n, args);
    if (!strcmp(cmd, "tmpfs")) return cmd_tmpfs(n, args);
    if (!strcmp(cmd, "churn")) return cmd_churn(n, args);
    if (!strcmp(cmd, "dirty")) return cmd_dirty(n, args);
    if (!strcmp(cmd, "kpageflags")) return cmd_kpageflags(n, args);
    if (!strcmp(cmd, "verify")) return cmd_verify();
    if (!strcmp(cmd, "status")) return reg_each(status_one, NULL);
    if (!strcmp(cmd, "stop")) return reg_each(stop_one, NULL);
    die("unknown command '%s'", cmd);
}
