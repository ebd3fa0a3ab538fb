/* A tiny /dev/lxd client for tests (built static, pushed into busybox containers).
 *   devlxd req METHOD PATH [BODY]   one request; prints the status code, a newline, the body
 *   devlxd events N [QUERY]         the raw event stream: prints N events, one per line
 *   devlxd wsevents N [QUERY]       the same over a websocket: prints N text frames
 *   devlxd raw TEXT                 sends TEXT (\r \n escapes) as is; prints the whole answer
 *   devlxd bighead SIZE             GET /1.0 with a SIZE-byte header; prints the status code
 *   devlxd flood N SECONDS          N connections at once, each sends GET /1.0 and is held for
 *                                   SECONDS; prints "ok=A refused=B failed=C"
 *   devlxd dump PATH                GET PATH on a connection of its own; writes the whole
 *                                   response (head and body, as received) to stdout
 *   devlxd burst N PATH             N requests of GET PATH one after another on one keep-alive
 *                                   connection, each answer read before the next request; stops
 *                                   at the first answer that is not 200 or at a closed connection;
 *                                   prints "ok=A last=STATUS"
 *   devlxd bench N PATH             N round trips (a connection each, as curl makes them) of
 *                                   GET PATH; prints the median and the 90th percentile in µs
 *                                   (scripts/bench/guest.py runs it inside a container)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <signal.h>
#include <time.h>
#include <sys/resource.h>

static const char *SOCK = "/dev/lxd/sock";

static int dial(void) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    strncpy(a.sun_path, SOCK, sizeof(a.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) { close(fd); return -1; }
    return fd;
}

static void put(int fd, const char *s, size_t n) {
    while (n > 0) { ssize_t w = write(fd, s, n); if (w <= 0) return; s += w; n -= (size_t)w; }
}

static char *slurp(int fd, size_t *len) {
    size_t cap = 65536, n = 0; char *b = malloc(cap);
    for (;;) {
        if (n + 4096 > cap) { cap *= 2; b = realloc(b, cap); }
        ssize_t r = read(fd, b + n, cap - n - 1);
        if (r <= 0) break;
        n += (size_t)r;
    }
    b[n] = 0; *len = n; return b;
}

static int status_of(const char *resp) {
    int code = 0;
    if (sscanf(resp, "HTTP/1.%*d %d", &code) != 1) return 0;
    return code;
}

/* Reads the response head (up to the blank line) byte by byte; returns the status code. */
static int read_head(int fd) {
    char h[16384]; size_t n = 0;
    while (n < sizeof(h) - 1) {
        if (read(fd, h + n, 1) != 1) break;
        n++;
        if (n >= 4 && memcmp(h + n - 4, "\r\n\r\n", 4) == 0) break;
    }
    h[n] = 0;
    return status_of(h);
}

static int req(const char *method, const char *path, const char *body) {
    int fd = dial();
    if (fd < 0) { perror("connect"); return 2; }
    char head[4096];
    size_t bl = body ? strlen(body) : 0;
    int n = snprintf(head, sizeof(head), "%s %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n"
                     "Content-Length: %zu\r\n\r\n", method, path, bl);
    put(fd, head, (size_t)n);
    if (bl) put(fd, body, bl);
    size_t len; char *r = slurp(fd, &len);
    char *b = strstr(r, "\r\n\r\n");
    printf("%d\n", status_of(r));
    if (b) fwrite(b + 4, 1, len - (size_t)(b + 4 - r), stdout);
    return 0;
}

static int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

static int bench(int n, const char *path) {
    if (n < 1) n = 1;
    long *us = calloc((size_t)n, sizeof(long));
    char head[1024];
    int hl = snprintf(head, sizeof(head), "GET %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n", path);
    for (int i = 0; i < n; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int fd = dial();
        if (fd < 0) { perror("connect"); return 2; }
        put(fd, head, (size_t)hl);
        size_t len; char *r = slurp(fd, &len);
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (status_of(r) != 200) { fprintf(stderr, "status %d\n", status_of(r)); return 3; }
        free(r);
        us[i] = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000L;
    }
    qsort(us, (size_t)n, sizeof(long), cmp_long);
    printf("median_us=%ld p90_us=%ld\n", us[n / 2], us[(n * 9) / 10 < n ? (n * 9) / 10 : n - 1]);
    return 0;
}

static int events(int n, const char *query, int ws) {
    int fd = dial();
    if (fd < 0) { perror("connect"); return 2; }
    char head[1024];
    int hl = snprintf(head, sizeof(head), "GET /1.0/events%s%s HTTP/1.1\r\nHost: lxd\r\n%s\r\n",
                      query ? "?" : "", query ? query : "",
                      ws ? "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" : "");
    put(fd, head, (size_t)hl);
    int code = read_head(fd);
    fprintf(stderr, "status %d\n", code);
    if (code != (ws ? 101 : 200)) return 1;
    printf("ready\n"); fflush(stdout);
    for (int i = 0; i < n; i++) {
        if (!ws) {
            char c;
            for (;;) {
                if (read(fd, &c, 1) != 1) return 1;
                putchar(c);
                if (c == '\n') break;
            }
        } else {
            unsigned char h2[2], ext[8];
            if (read(fd, h2, 2) != 2) return 1;
            size_t len = h2[1] & 0x7f;
            if (len == 126) { if (read(fd, ext, 2) != 2) return 1; len = ((size_t)ext[0] << 8) | ext[1]; }
            else if (len == 127) return 1;
            char *p = malloc(len + 1); size_t got = 0;
            while (got < len) { ssize_t r = read(fd, p + got, len - got); if (r <= 0) return 1; got += (size_t)r; }
            p[len] = 0;
            if ((h2[0] & 0x0f) != 1) { i--; free(p); continue; }  /* only text frames count */
            printf("%s\n", p); free(p);
        }
        fflush(stdout);
    }
    return 0;
}

static int raw(const char *text) {
    int fd = dial();
    if (fd < 0) { perror("connect"); return 2; }
    char *out = malloc(strlen(text) + 1); size_t n = 0;
    for (const char *p = text; *p; p++) {
        if (p[0] == '\\' && p[1] == 'r') { out[n++] = '\r'; p++; }
        else if (p[0] == '\\' && p[1] == 'n') { out[n++] = '\n'; p++; }
        else out[n++] = *p;
    }
    put(fd, out, n);
    shutdown(fd, SHUT_WR);
    size_t len; char *r = slurp(fd, &len);
    fwrite(r, 1, len, stdout);
    return 0;
}

static int bighead(size_t size) {
    int fd = dial();
    if (fd < 0) { perror("connect"); return 2; }
    const char *a = "GET /1.0 HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\nX-Big: ";
    put(fd, a, strlen(a));
    char *pad = malloc(size); memset(pad, 'a', size);
    put(fd, pad, size);
    put(fd, "\r\n\r\n", 4);
    size_t len; char *r = slurp(fd, &len);
    printf("%d\n", status_of(r));
    return 0;
}

static int flood(int n, int seconds) {
    struct rlimit rl;  /* room for N descriptors, as far as the hard limit allows */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)n + 64) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (rlim_t)n + 64 ? (rlim_t)n + 64 : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int *fds = calloc((size_t)n, sizeof(int));
    const char *q = "GET /1.0 HTTP/1.1\r\nHost: lxd\r\n\r\n";
    int failed = 0;
    for (int i = 0; i < n; i++) {
        fds[i] = dial();
        if (fds[i] < 0) { failed++; continue; }
        put(fds[i], q, strlen(q));
    }
    sleep((unsigned)seconds);
    int ok = 0, refused = 0;
    for (int i = 0; i < n; i++) {
        if (fds[i] < 0) continue;
        char b[512]; ssize_t r = read(fds[i], b, sizeof(b) - 1);
        if (r <= 0) { failed++; continue; }
        b[r] = 0;
        int code = status_of(b);
        if (code == 200) ok++; else if (code >= 400 && code < 600) refused++; else failed++;
        close(fds[i]);
    }
    printf("ok=%d refused=%d failed=%d\n", ok, refused, failed);
    return 0;
}

static int dump(const char *path) {
    int fd = dial();
    if (fd < 0) { perror("connect"); return 2; }
    char head[1024];
    int hl = snprintf(head, sizeof(head), "GET %s HTTP/1.1\r\nHost: lxd\r\nConnection: close\r\n\r\n", path);
    put(fd, head, (size_t)hl);
    char b[65536]; ssize_t r;
    while ((r = read(fd, b, sizeof(b))) > 0) fwrite(b, 1, (size_t)r, stdout);
    return 0;
}

/* Reads one response (head, then a Content-Length body) from a keep-alive connection. */
static int one_response(int fd) {
    char h[16384]; size_t n = 0;
    while (n < sizeof(h) - 1) {
        if (read(fd, h + n, 1) != 1) return 0;
        n++;
        if (n >= 4 && memcmp(h + n - 4, "\r\n\r\n", 4) == 0) break;
    }
    h[n] = 0;
    long len = 0;
    for (char *p = h; (p = strchr(p, '\n')) != NULL; p++)
        if (!strncasecmp(p + 1, "content-length:", 15)) len = atol(p + 16);
    char b[4096];
    while (len > 0) {
        ssize_t r = read(fd, b, len < (long)sizeof(b) ? (size_t)len : sizeof(b));
        if (r <= 0) return 0;
        len -= r;
    }
    return status_of(h);
}

static int burst(int n, const char *path) {
    int fd = dial();
    if (fd < 0) { perror("connect"); return 2; }
    char head[1024];
    int hl = snprintf(head, sizeof(head), "GET %s HTTP/1.1\r\nHost: lxd\r\n\r\n", path);
    int ok = 0, last = 0;
    for (int i = 0; i < n; i++) {
        put(fd, head, (size_t)hl);
        last = one_response(fd);
        if (last != 200) break;
        ok++;
    }
    printf("ok=%d last=%d\n", ok, last);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 4 && !strcmp(argv[1], "req")) return req(argv[2], argv[3], argc > 4 ? argv[4] : NULL);
    if (argc >= 3 && !strcmp(argv[1], "events")) return events(atoi(argv[2]), argc > 3 ? argv[3] : NULL, 0);
    if (argc >= 3 && !strcmp(argv[1], "wsevents")) return events(atoi(argv[2]), argc > 3 ? argv[3] : NULL, 1);
    if (argc >= 3 && !strcmp(argv[1], "raw")) return raw(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "bighead")) return bighead((size_t)atol(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "flood")) return flood(atoi(argv[2]), atoi(argv[3]));
    if (argc >= 3 && !strcmp(argv[1], "dump")) return dump(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "burst")) return burst(atoi(argv[2]), argv[3]);
    if (argc >= 4 && !strcmp(argv[1], "bench")) return bench(atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: devlxd req|events|wsevents|raw|bighead|flood|dump|burst|bench ...\n");
    return 2;
}
