/*
 * attack.c --
 *
 *	The attacker of security.test's "a worker is untrusted" tests: a
 *	small Tcl extension that a handler loads inside a pool's worker
 *	(running as nobody) to do what code execution there could do, through
 *	the worker's own descriptors and /proc/self: write memory (through
 *	/proc/self/mem, which ignores page protection where the kernel lets
 *	it, and with mprotect), write raw bytes into descriptors, send and
 *	receive descriptors. Every command returns a result instead of
 *	crashing, so that the test sees what was refused.
 *
 *	Built by the test with cc, against the running Tcl's headers, with
 *	stubs. Loading it makes the worker dumpable again (a worker that
 *	changed its ids is not, which makes its /proc/self/mem root's), as
 *	code running in it may.
 */

#define _GNU_SOURCE
#include <tcl.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

static int
Fail(Tcl_Interp *interp, const char *what)
{
    Tcl_SetObjResult(interp, Tcl_ObjPrintf("%s %s", what, Tcl_ErrnoId()));
    return TCL_OK;
}

static int
GetWide(Tcl_Interp *interp, Tcl_Obj *obj, Tcl_WideInt *value)
{
    const char *text = Tcl_GetString(obj);
    char *end;
    errno = 0;
    *value = (Tcl_WideInt) strtoull(text, &end, 0);
    if (errno || *end) {
        Tcl_SetObjResult(interp, Tcl_ObjPrintf("bad number \"%s\"", text));
        return TCL_ERROR;
    }
    return TCL_OK;
}

/* Hex text to bytes; returns the length, or -1. */
static int
FromHex(const char *hex, unsigned char *out, int room)
{
    int len = (int) strlen(hex) / 2, i;
    if (len > room) return -1;
    for (i = 0; i < len; i++) {
        unsigned int byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) return -1;
        out[i] = (unsigned char) byte;
    }
    return len;
}

static Tcl_Obj *
ToHex(const unsigned char *bytes, int len)
{
    Tcl_Obj *result = Tcl_NewObj();
    int i;
    for (i = 0; i < len; i++) {
        Tcl_AppendPrintfToObj(result, "%02x", bytes[i]);
    }
    return result;
}

static int
AttackCmd(void *data, Tcl_Interp *interp, int objc, Tcl_Obj *const objv[])
{
    const char *sub;
    static unsigned char buffer[65536];
    (void) data;
    if (objc < 2) {
        Tcl_WrongNumArgs(interp, 1, objv, "subcommand ?arg ...?");
        return TCL_ERROR;
    }
    sub = Tcl_GetString(objv[1]);

    if (!strcmp(sub, "memwrite") && objc == 4) {
        /* attack memwrite ADDR HEX: through /proc/self/mem */
        Tcl_WideInt addr;
        int len, fd;
        ssize_t done;
        if (GetWide(interp, objv[2], &addr) != TCL_OK) return TCL_ERROR;
        len = FromHex(Tcl_GetString(objv[3]), buffer, sizeof(buffer));
        if (len < 0) return Fail(interp, "hex");
        fd = open("/proc/self/mem", O_RDWR);
        if (fd < 0) return Fail(interp, "open");
        done = pwrite(fd, buffer, len, (off_t) addr);
        close(fd);
        if (done != len) return Fail(interp, "write");
        Tcl_SetObjResult(interp, Tcl_NewStringObj("ok", -1));
        return TCL_OK;
    }
    if (!strcmp(sub, "memread") && objc == 4) {
        Tcl_WideInt addr, len;
        int fd;
        ssize_t done;
        if (GetWide(interp, objv[2], &addr) != TCL_OK) return TCL_ERROR;
        if (GetWide(interp, objv[3], &len) != TCL_OK) return TCL_ERROR;
        if (len > (Tcl_WideInt) sizeof(buffer)) len = sizeof(buffer);
        fd = open("/proc/self/mem", O_RDONLY);
        if (fd < 0) return Fail(interp, "open");
        done = pread(fd, buffer, (size_t) len, (off_t) addr);
        close(fd);
        if (done < 0) return Fail(interp, "read");
        Tcl_SetObjResult(interp, ToHex(buffer, (int) done));
        return TCL_OK;
    }
    if (!strcmp(sub, "mprotect") && objc == 4) {
        /* attack mprotect ADDR LEN: ask for write access */
        Tcl_WideInt addr, len;
        if (GetWide(interp, objv[2], &addr) != TCL_OK) return TCL_ERROR;
        if (GetWide(interp, objv[3], &len) != TCL_OK) return TCL_ERROR;
        if (mprotect((void *) (uintptr_t) addr, (size_t) len, PROT_READ | PROT_WRITE) != 0) {
            return Fail(interp, "mprotect");
        }
        Tcl_SetObjResult(interp, Tcl_NewStringObj("ok", -1));
        return TCL_OK;
    }
    if (!strcmp(sub, "write") && objc == 4) {
        /* attack write FD HEX: raw bytes into a descriptor */
        int fd, len;
        if (Tcl_GetIntFromObj(interp, objv[2], &fd) != TCL_OK) return TCL_ERROR;
        len = FromHex(Tcl_GetString(objv[3]), buffer, sizeof(buffer));
        if (len < 0) return Fail(interp, "hex");
        if (write(fd, buffer, len) != len) return Fail(interp, "write");
        Tcl_SetObjResult(interp, Tcl_NewStringObj("ok", -1));
        return TCL_OK;
    }
    if (!strcmp(sub, "fds") && objc == 3) {
        /* attack fds KIND: descriptors that are writable pipes ("pipe")
         * or sockets of a type ("stream", "seqpacket", "dgram") */
        const char *kind = Tcl_GetString(objv[2]);
        Tcl_Obj *list = Tcl_NewObj();
        int fd;
        for (fd = 0; fd < 1024; fd++) {
            struct stat st;
            if (fstat(fd, &st) != 0) continue;
            if (!strcmp(kind, "pipe")) {
                int flags = fcntl(fd, F_GETFL);
                if (S_ISFIFO(st.st_mode) && (flags & O_ACCMODE) != O_RDONLY) {
                    Tcl_ListObjAppendElement(interp, list, Tcl_NewIntObj(fd));
                }
            } else if (S_ISSOCK(st.st_mode)) {
                int type = 0;
                socklen_t size = sizeof(type);
                int want = !strcmp(kind, "stream") ? SOCK_STREAM
                         : !strcmp(kind, "seqpacket") ? SOCK_SEQPACKET : SOCK_DGRAM;
                struct sockaddr_storage addr;
                socklen_t alen = sizeof(addr);
                if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == want
                        && getsockname(fd, (struct sockaddr *) &addr, &alen) == 0
                        && addr.ss_family == AF_UNIX) {
                    Tcl_ListObjAppendElement(interp, list, Tcl_NewIntObj(fd));
                }
            }
        }
        Tcl_SetObjResult(interp, list);
        return TCL_OK;
    }
    if (!strcmp(sub, "tcpfds") && objc == 2) {
        /* attack tcpfds: connected TCP sockets ({fd peerport} pairs) */
        Tcl_Obj *list = Tcl_NewObj();
        int fd;
        for (fd = 0; fd < 1024; fd++) {
            struct sockaddr_storage addr;
            socklen_t alen = sizeof(addr);
            int type = 0;
            socklen_t size = sizeof(type);
            if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) != 0 || type != SOCK_STREAM) continue;
            if (getpeername(fd, (struct sockaddr *) &addr, &alen) != 0) continue;
            if (addr.ss_family == AF_INET) {
                Tcl_ListObjAppendElement(interp, list, Tcl_NewIntObj(fd));
                Tcl_ListObjAppendElement(interp, list,
                    Tcl_NewIntObj(ntohs(((struct sockaddr_in *) &addr)->sin_port)));
            }
        }
        Tcl_SetObjResult(interp, list);
        return TCL_OK;
    }
    if (!strcmp(sub, "grandchild") && objc == 6) {
        /* attack grandchild QUEUEFD SECONDS ADDR HEX: forks a process of
         * its own session that outlives the worker: for SECONDS it takes
         * connections off QUEUEFD (answering "stolen") and writes HEX at
         * ADDR (0: nowhere) every 50 ms. Returns its pid. */
        int queue, seconds, len, i;
        Tcl_WideInt addr;
        pid_t child;
        if (Tcl_GetIntFromObj(interp, objv[2], &queue) != TCL_OK) return TCL_ERROR;
        if (Tcl_GetIntFromObj(interp, objv[3], &seconds) != TCL_OK) return TCL_ERROR;
        if (GetWide(interp, objv[4], &addr) != TCL_OK) return TCL_ERROR;
        len = FromHex(Tcl_GetString(objv[5]), buffer, sizeof(buffer));
        if (len < 0) return Fail(interp, "hex");
        child = fork();
        if (child < 0) return Fail(interp, "fork");
        if (child == 0) {
            setsid();
            for (i = 0; i < seconds * 20; i++) {
                struct pollfd p;
                if (addr != 0) {
                    int fd = open("/proc/self/mem", O_RDWR);
                    if (fd >= 0) {
                        if (pwrite(fd, buffer, len, (off_t) addr) < 0) {}
                        close(fd);
                    }
                }
                p.fd = queue;
                p.events = POLLIN;
                if (queue >= 0 && poll(&p, 1, 50) == 1) {
                    struct msghdr msg;
                    struct iovec iov;
                    struct cmsghdr *cmsg;
                    union { struct cmsghdr align; char space[CMSG_SPACE(sizeof(int))]; } control;
                    unsigned char payload[64];
                    int conn = -1;
                    memset(&msg, 0, sizeof(msg));
                    iov.iov_base = payload;
                    iov.iov_len = sizeof(payload);
                    msg.msg_iov = &iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = control.space;
                    msg.msg_controllen = sizeof(control.space);
                    if (recvmsg(queue, &msg, MSG_DONTWAIT) > 0) {
                        for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
                            if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
                                memcpy(&conn, CMSG_DATA(cmsg), sizeof(int));
                            }
                        }
                    }
                    if (conn >= 0) {
                        if (write(conn, "stolen\n", 7) < 0) {}
                        close(conn);
                    }
                } else if (queue < 0) {
                    usleep(50000);
                }
            }
            _exit(0);
        }
        Tcl_SetObjResult(interp, Tcl_NewIntObj(child));
        return TCL_OK;
    }
    if (!strcmp(sub, "flood") && objc == 4) {
        /* attack flood SOCK MS: one-byte messages, as fast as the socket
         * takes them, for MS milliseconds; returns how many were sent */
        int sock, ms;
        long sent = 0;
        struct timespec start, now;
        if (Tcl_GetIntFromObj(interp, objv[2], &sock) != TCL_OK) return TCL_ERROR;
        if (Tcl_GetIntFromObj(interp, objv[3], &ms) != TCL_OK) return TCL_ERROR;
        clock_gettime(CLOCK_MONOTONIC, &start);
        do {
            if (send(sock, "x", 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1) {
                sent++;
            } else {
                struct pollfd p;
                p.fd = sock;
                p.events = POLLOUT;
                poll(&p, 1, 10);
            }
            clock_gettime(CLOCK_MONOTONIC, &now);
        } while ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 < ms);
        Tcl_SetObjResult(interp, Tcl_NewWideIntObj(sent));
        return TCL_OK;
    }
    if (!strcmp(sub, "socketpair") && objc == 2) {
        int pair[2];
        Tcl_Obj *list;
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) return Fail(interp, "socketpair");
        list = Tcl_NewObj();
        Tcl_ListObjAppendElement(interp, list, Tcl_NewIntObj(pair[0]));
        Tcl_ListObjAppendElement(interp, list, Tcl_NewIntObj(pair[1]));
        Tcl_SetObjResult(interp, list);
        return TCL_OK;
    }
    if (!strcmp(sub, "sendfd") && objc == 5) {
        /* attack sendfd SOCK FD HEX: one message, with FD (-1: none) */
        int sock, fd, len;
        struct msghdr msg;
        struct iovec iov;
        union { struct cmsghdr align; char space[CMSG_SPACE(sizeof(int))]; } control;
        if (Tcl_GetIntFromObj(interp, objv[2], &sock) != TCL_OK) return TCL_ERROR;
        if (Tcl_GetIntFromObj(interp, objv[3], &fd) != TCL_OK) return TCL_ERROR;
        len = FromHex(Tcl_GetString(objv[4]), buffer, sizeof(buffer));
        if (len < 0) return Fail(interp, "hex");
        memset(&msg, 0, sizeof(msg));
        iov.iov_base = buffer;
        iov.iov_len = len;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (fd >= 0) {
            struct cmsghdr *cmsg;
            memset(&control, 0, sizeof(control));
            msg.msg_control = control.space;
            msg.msg_controllen = sizeof(control.space);
            cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
        }
        if (sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) return Fail(interp, "sendmsg");
        Tcl_SetObjResult(interp, Tcl_NewStringObj("ok", -1));
        return TCL_OK;
    }
    if (!strcmp(sub, "recvfd") && objc == 4) {
        /* attack recvfd SOCK MS: {fd hex} of one message, or "timeout" */
        int sock, ms, fd = -1;
        ssize_t got;
        struct pollfd p;
        struct msghdr msg;
        struct iovec iov;
        struct cmsghdr *cmsg;
        union { struct cmsghdr align; char space[CMSG_SPACE(sizeof(int))]; } control;
        Tcl_Obj *list;
        if (Tcl_GetIntFromObj(interp, objv[2], &sock) != TCL_OK) return TCL_ERROR;
        if (Tcl_GetIntFromObj(interp, objv[3], &ms) != TCL_OK) return TCL_ERROR;
        p.fd = sock;
        p.events = POLLIN;
        if (poll(&p, 1, ms) != 1) {
            Tcl_SetObjResult(interp, Tcl_NewStringObj("timeout", -1));
            return TCL_OK;
        }
        memset(&msg, 0, sizeof(msg));
        iov.iov_base = buffer;
        iov.iov_len = 64;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof(control.space);
        got = recvmsg(sock, &msg, MSG_DONTWAIT);
        if (got < 0) return Fail(interp, "recvmsg");
        for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
            if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
                memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
            }
        }
        list = Tcl_NewObj();
        Tcl_ListObjAppendElement(interp, list, Tcl_NewIntObj(fd));
        Tcl_ListObjAppendElement(interp, list, ToHex(buffer, (int) got));
        Tcl_SetObjResult(interp, list);
        return TCL_OK;
    }
    if (!strcmp(sub, "read") && objc == 4) {
        /* attack read FD MS: what arrives within MS, or "timeout" */
        int fd, ms;
        ssize_t got;
        struct pollfd p;
        if (Tcl_GetIntFromObj(interp, objv[2], &fd) != TCL_OK) return TCL_ERROR;
        if (Tcl_GetIntFromObj(interp, objv[3], &ms) != TCL_OK) return TCL_ERROR;
        p.fd = fd;
        p.events = POLLIN;
        if (poll(&p, 1, ms) != 1) {
            Tcl_SetObjResult(interp, Tcl_NewStringObj("timeout", -1));
            return TCL_OK;
        }
        got = read(fd, buffer, 4096);
        if (got < 0) return Fail(interp, "read");
        Tcl_SetObjResult(interp, Tcl_NewStringObj((char *) buffer, (int) got));
        return TCL_OK;
    }
    if (!strcmp(sub, "tiocsti") && objc == 4) {
        /* attack tiocsti FD TEXT: push TEXT into the terminal's input */
        int fd;
        const char *text;
        if (Tcl_GetIntFromObj(interp, objv[2], &fd) != TCL_OK) return TCL_ERROR;
        for (text = Tcl_GetString(objv[3]); *text; text++) {
            if (ioctl(fd, TIOCSTI, text) != 0) return Fail(interp, "tiocsti");
        }
        Tcl_SetObjResult(interp, Tcl_NewStringObj("ok", -1));
        return TCL_OK;
    }
    if (!strcmp(sub, "close") && objc == 3) {
        int fd;
        if (Tcl_GetIntFromObj(interp, objv[2], &fd) != TCL_OK) return TCL_ERROR;
        close(fd);
        return TCL_OK;
    }
    Tcl_SetObjResult(interp, Tcl_ObjPrintf("bad attack \"%s\"", sub));
    return TCL_ERROR;
}

int
Attack_Init(Tcl_Interp *interp)
{
    if (Tcl_InitStubs(interp, "8.6-", 0) == NULL) {
        return TCL_ERROR;
    }
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    Tcl_CreateObjCommand(interp, "attack", AttackCmd, NULL, NULL);
    return TCL_OK;
}
