/*
 * native_prefork.c --
 *
 *	The near-limit baseline for bench/run.tcl: N C processes that each
 *	answer one HTTP request per connection with "ok", as the Tcl servers
 *	do. In "shared" mode they all block in accept() on one listener (the
 *	classic pre-fork); in "reuseport" mode each has its own SO_REUSEPORT
 *	listener and the kernel hashes connections among them.
 *
 *	Usage: native_prefork PORT WORKERS shared|reuseport SLOW_PERCENT
 *	Prints "port P pids PID..." once the workers run; stops on SIGTERM.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char reply[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    "Connection: close\r\n\r\nok\n";

static int open_listener(int port, int reuseport)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in addr;

    if (fd < 0) { perror("socket"); exit(1); }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    if (bind(fd, (struct sockaddr *) &addr, sizeof addr) < 0) { perror("bind"); exit(1); }
    if (listen(fd, SOMAXCONN) < 0) { perror("listen"); exit(1); }
    return fd;
}

static void serve(int listener, int slow_percent)
{
    char buffer[4096];
    srand(getpid());
    for (;;) {
        int conn = accept(listener, NULL, NULL);
        size_t have = 0;
        if (conn < 0) continue;
        /* Read the request up to the blank line that ends its headers. */
        while (have < sizeof buffer - 1) {
            ssize_t n = read(conn, buffer + have, sizeof buffer - 1 - have);
            if (n <= 0) break;
            have += n;
            buffer[have] = 0;
            if (strstr(buffer, "\r\n\r\n")) break;
        }
        if (slow_percent > 0 && rand() % 100 < slow_percent) {
            struct timespec pause = {0, 100 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
        if (write(conn, reply, sizeof reply - 1) < 0) { /* client gone */ }
        close(conn);
    }
}

int main(int argc, char **argv)
{
    int port, workers, reuseport, slow, shared = -1, i;
    pid_t pids[256];

    if (argc != 5) {
        fprintf(stderr, "usage: %s PORT WORKERS shared|reuseport SLOW_PERCENT\n", argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    workers = atoi(argv[2]);
    reuseport = strcmp(argv[3], "reuseport") == 0;
    slow = atoi(argv[4]);
    if (workers < 1 || workers > 256) return 2;

    if (!reuseport || port == 0) {
        shared = open_listener(port, reuseport);
        struct sockaddr_in bound;
        socklen_t len = sizeof bound;
        getsockname(shared, (struct sockaddr *) &bound, &len);
        port = ntohs(bound.sin_port);
    }
    for (i = 0; i < workers; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            int listener = shared;
            alarm(600);
            if (reuseport && (i > 0 || shared < 0)) listener = open_listener(port, 1);
            serve(listener, slow);
        }
    }
    /* In reuseport mode the first listener belongs to worker 0 only. */
    if (reuseport && shared >= 0) close(shared);
    printf("port %d pids", port);
    for (i = 0; i < workers; i++) printf(" %d", (int) pids[i]);
    printf("\n");
    fflush(stdout);
    signal(SIGTERM, SIG_DFL);
    /* Never outlive a benchmark that died: stop by ourselves after 10 minutes. */
    alarm(600);
    {
        sigset_t set;
        int sig;
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGALRM);
        sigprocmask(SIG_BLOCK, &set, NULL);
        sigwait(&set, &sig);
    }
    for (i = 0; i < workers; i++) kill(pids[i], SIGTERM);
    for (i = 0; i < workers; i++) waitpid(pids[i], NULL, 0);
    return 0;
}
