/*
 * agent: the lab guest's command agent. Reads requests from a serial port (its host side is a QEMU unix-socket
 * chardev), runs each with /bin/sh -c, and answers with the exit status and output. Protocol (one line each
 * way, see README.md beside this file):
 *
 *   host  -> guest   VMPRUNE-REQ <id> <timeoutMs> <base64 command>
 *   guest -> host    VMPRUNE-RES <id> <status> <base64 stdout|-> <base64 stderr|->
 *
 * Anything else on the line is skipped: after a live migration the host reconnects to the destination's socket
 * and may see leftovers. One request at a time; no threads.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE (2u << 20)      /* commands up to 1 MiB, base64-encoded */
#define MAX_OUTPUT (8u << 20)    /* per stream; the rest is dropped and said so */
#define STATUS_TIMEOUT 124
#define STATUS_BAD_REQUEST 125

static int in_fd = -1, out_fd = -1;

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64_value(int c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Decodes base64 into a NUL-terminated string; NULL on a malformed field. */
static char *b64_decode(const char *s, size_t len) {
    char *out = malloc(len / 4 * 3 + 4);
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0;
    if (!out) return NULL;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '=') break;
        int v = b64_value((unsigned char)s[i]);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (char)((acc >> bits) & 0xff);
        }
    }
    out[n] = 0;
    return out;
}

static void write_all(const char *p, size_t len) {
    while (len > 0) {
        ssize_t w = write(out_fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = {.fd = out_fd, .events = POLLOUT};
                poll(&pfd, 1, 1000);
                continue;
            }
            return; /* host side gone: the reply is lost, the host times out */
        }
        p += w;
        len -= (size_t)w;
    }
}

static void write_b64(const unsigned char *p, size_t len) {
    char buf[4096];
    size_t n = 0;
    if (len == 0) {
        write_all("-", 1);
        return;
    }
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < len) v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < len) v |= p[i + 2];
        buf[n++] = B64[(v >> 18) & 63];
        buf[n++] = B64[(v >> 12) & 63];
        buf[n++] = i + 1 < len ? B64[(v >> 6) & 63] : '=';
        buf[n++] = i + 2 < len ? B64[v & 63] : '=';
        if (n > sizeof buf - 4) {
            write_all(buf, n);
            n = 0;
        }
    }
    write_all(buf, n);
}

struct output {
    unsigned char *data;
    size_t len, cap;
    int truncated;
};

static void output_add(struct output *o, const unsigned char *p, size_t len) {
    if (o->len + len > MAX_OUTPUT) {
        len = MAX_OUTPUT - o->len;
        o->truncated = 1;
    }
    if (o->len + len > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        while (cap < o->len + len) cap *= 2;
        unsigned char *d = realloc(o->data, cap);
        if (!d) {
            o->truncated = 1;
            return;
        }
        o->data = d;
        o->cap = cap;
    }
    memcpy(o->data + o->len, p, len);
    o->len += len;
}

static void output_str(struct output *o, const char *s) { output_add(o, (const unsigned char *)s, strlen(s)); }

/* Reads what a pipe has now; returns 0 at EOF or error, 1 if it may have more. */
static int drain(int fd, struct output *o) {
    unsigned char buf[65536];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r > 0) {
            output_add(o, buf, (size_t)r);
            continue;
        }
        if (r < 0 && (errno == EINTR)) continue;
        if (r < 0 && errno == EAGAIN) return 1;
        return 0;
    }
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void reply(unsigned long id, int status, struct output *out, struct output *err) {
    char head[64];
    if (out->truncated) output_str(err, "\nagent: stdout truncated at 8 MiB\n");
    int n = snprintf(head, sizeof head, "VMPRUNE-RES %lu %d ", id, status);
    write_all(head, (size_t)n);
    write_b64(out->data, out->len);
    write_all(" ", 1);
    write_b64(err->data, err->len);
    write_all("\n", 1);
}

static void run_command(unsigned long id, long timeout_ms, const char *command) {
    struct output out = {0}, err = {0};
    int po[2], pe[2];
    if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0) {
        output_str(&err, "agent: pipe failed\n");
        reply(id, STATUS_BAD_REQUEST, &out, &err);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        setpgid(0, 0);
        dup2(devnull, 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        signal(SIGPIPE, SIG_DFL);
        execl("/bin/sh", "sh", "-c", command, (char *)NULL);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    fcntl(po[0], F_SETFL, O_NONBLOCK);
    fcntl(pe[0], F_SETFL, O_NONBLOCK);
    int status = STATUS_BAD_REQUEST, open_o = 1, open_e = 1, exited = 0;
    int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
    if (pid < 0) {
        output_str(&err, "agent: fork failed\n");
        exited = 1;
    }
    while (!exited) {
        struct pollfd pfd[2] = {{.fd = open_o ? po[0] : -1, .events = POLLIN}, {.fd = open_e ? pe[0] : -1, .events = POLLIN}};
        poll(pfd, 2, 50);
        if (open_o) open_o = drain(po[0], &out);
        if (open_e) open_e = drain(pe[0], &err);
        int ws;
        pid_t w = waitpid(pid, &ws, WNOHANG);
        if (w == pid) {
            status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
            exited = 1;
        } else if (deadline && now_ms() > deadline) {
            kill(-pid, SIGKILL);
            waitpid(pid, &ws, 0);
            status = STATUS_TIMEOUT;
            output_str(&err, "\nagent: command timed out and was killed\n");
            exited = 1;
        }
    }
    /* What the shell wrote is in the pipes now; daemons it left may hold them open, so do not wait for EOF. */
    if (open_o) drain(po[0], &out);
    if (open_e) drain(pe[0], &err);
    close(po[0]);
    close(pe[0]);
    reply(id, status, &out, &err);
    free(out.data);
    free(err.data);
}

static void handle_line(char *line, size_t len) {
    static const char prefix[] = "VMPRUNE-REQ ";
    if (len < sizeof prefix || memcmp(line, prefix, sizeof prefix - 1) != 0) return;
    char *p = line + sizeof prefix - 1, *end;
    unsigned long id = strtoul(p, &end, 10);
    if (end == p || *end != ' ') return; /* no usable id: nobody to answer */
    p = end + 1;
    long timeout_ms = strtol(p, &end, 10);
    struct output none = {0}, err = {0};
    if (end == p || *end != ' ' || timeout_ms < 0) {
        output_str(&err, "agent: malformed request (timeout)\n");
        reply(id, STATUS_BAD_REQUEST, &none, &err);
        free(err.data);
        return;
    }
    p = end + 1;
    char *command = b64_decode(p, len - (size_t)(p - line));
    if (!command) {
        output_str(&err, "agent: malformed request (base64 command)\n");
        reply(id, STATUS_BAD_REQUEST, &none, &err);
        free(err.data);
        return;
    }
    run_command(id, timeout_ms, command);
    free(command);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: agent DEVICE|-\n");
        return 2;
    }
    if (strcmp(argv[1], "-") == 0) {
        in_fd = 0;
        out_fd = 1;
    } else {
        in_fd = out_fd = open(argv[1], O_RDWR | O_NOCTTY);
        if (in_fd < 0) {
            fprintf(stderr, "agent: cannot open %s: %s\n", argv[1], strerror(errno));
            return 1;
        }
        struct termios t;
        if (tcgetattr(in_fd, &t) == 0) {
            cfmakeraw(&t);
            t.c_cflag |= CLOCAL | CREAD;
            t.c_cflag &= ~(tcflag_t)CRTSCTS;
            cfsetspeed(&t, B115200);
            tcsetattr(in_fd, TCSANOW, &t);
        }
    }
    signal(SIGPIPE, SIG_IGN);
    write_all("VMPRUNE-READY\n", 14);
    char *line = malloc(MAX_LINE);
    size_t len = 0;
    int skipping = 0; /* inside an over-long line: drop until its newline */
    if (!line) return 1;
    for (;;) {
        char buf[65536];
        ssize_t r = read(in_fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (in_fd == 0) return 0;
            /* A serial port reports no EOF; a closed pty or socket might. Wait and retry. */
            usleep(100000);
            continue;
        }
        for (ssize_t i = 0; i < r; i++) {
            char c = buf[i];
            if (c == '\n' || c == '\r') {
                if (!skipping && len > 0) {
                    line[len] = 0;
                    handle_line(line, len);
                }
                len = 0;
                skipping = 0;
            } else if (!skipping) {
                if (len + 1 >= MAX_LINE) {
                    skipping = 1;
                    len = 0;
                } else {
                    line[len++] = c;
                }
            }
        }
    }
}
