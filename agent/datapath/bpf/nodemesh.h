/* nodemesh.h: constants and the map key/value structs shared by the capture programs and
 * agent/datapath/layout.py (which mirrors them with ctypes). Change one, change the other, and
 * bump NM_LAYOUT_VERSION so that a restarted agent replaces pinned maps instead of adopting
 * maps whose layout it cannot read.
 *
 * The numbers the agent also uses (the proxy mark, the capture mark, the HBONE port) are not
 * written here: the loader passes them as -D defines (agent/datapath/programs.py, Marks.cflags)
 * from their one definition in agent/base/constants.py or the agent's flags.
 */
#ifndef NODEMESH_H
#define NODEMESH_H

#define NM_LAYOUT_VERSION 5

#if !defined(NM_PROXY_MARK) || !defined(NM_CAPTURE_MARK) || !defined(NM_HBONE_PORT)
#error "compile with -DNM_PROXY_MARK, -DNM_CAPTURE_MARK and -DNM_HBONE_PORT (see Marks.cflags)"
#endif

/* Address families, as in <sys/socket.h>; the key carries one so IPv6 fits the same maps. */
#define NM_AF_INET 2
#define NM_AF_INET6 10

/* nm_pod.flags */
#define NM_POD_MESHED 0x1

/* Exempt ports per direction; 0 marks an unused slot. */
#define NM_MAX_EXCLUDED_PORTS 16

/* Slots of the listener SOCKMAP, filled by the agent with its transparent listeners. */
#define NM_LISTENER_OUTBOUND 0 /* captured connections of meshed pods */
#define NM_LISTENER_INBOUND 1  /* plaintext to a meshed pod */
#define NM_LISTENER_HBONE 2    /* HBONE tunnels (the port is NM_HBONE_PORT) */
#define NM_LISTENER_COUNT 3

/* Programs, for the counters index (program * NM_COUNTER_COUNT + counter). */
#define NM_PROG_POD_INGRESS 0
#define NM_PROG_UPLINK_INGRESS 1
#define NM_PROG_COUNT 2

/* Counters: what each program decided for the TCP segments it examined. */
#define NM_CNT_CAPTURED 0      /* a SYN handed to a listener */
#define NM_CNT_OWNED 1         /* a segment handed to the proxy socket that owns its flow */
#define NM_CNT_PASSED 2        /* examined and left to normal forwarding */
#define NM_CNT_EXEMPT 3        /* would be captured, but the port is excluded by annotation */
#define NM_CNT_FAILED_CLOSED 4 /* should be captured, no listener: dropped */
#define NM_CNT_FAILED_OPEN 5   /* should be captured, no listener, fail-open: passed */
#define NM_CNT_TIME_WAIT 6     /* a SYN handed to the TIME_WAIT socket holding its 4-tuple */
#define NM_CNT_FRAGMENT 7      /* a TCP fragment to or from a meshed pod: dropped */
#define NM_COUNTER_COUNT 8

/* nm_settings.flags */
#define NM_SETTING_FAIL_OPEN 0x1

/* A pod address. IPv4 uses addr[0] (network order) and leaves the rest zero. */
struct nm_addr {
    __u32 family;
    __u32 addr[4];
};

/* What the agent knows about one local pod (meshed or not). */
struct nm_pod {
    __u32 flags;
    __u32 ifindex; /* host-side interface; traffic claiming the pod's IP elsewhere is not its own */
    __u16 exclude_out[NM_MAX_EXCLUDED_PORTS];
    __u16 exclude_in[NM_MAX_EXCLUDED_PORTS];
};

struct nm_settings {
    __u32 flags;
};

/* Same-node splice (splice.bpf.c): sockets spliced at once (two per connection). */
#define NM_SPLICE_MAX_SOCKETS 65536

/* One spliced socket, keyed by its socket cookie: where its bytes go and how many went.
 * Written by the program (the agent only creates it). */
struct nm_splice_link {
    __u64 peer;  /* the other socket's cookie */
    __u64 bytes; /* bytes redirected from this socket to the peer */
    __u64 kept;  /* bytes left on this socket for the proxy to forward (see splice.bpf.c) */
    __u64 next;  /* NM_SPLICE_SEQ_SEEN | TCP sequence number after the last byte passed on */
    __u64 trimmed; /* bytes of retransmitted segments already passed on, cut off (splice.bpf.c) */
};

#define NM_SPLICE_SEQ_SEEN (1ULL << 32)

/* How far the program may redirect, per socket cookie. Written by the agent only (a whole
 * value at a time, so the program never sees half an update). */
struct nm_splice_credit {
    __u64 limit; /* redirect while link.bytes stays within this */
    __u64 taken; /* kept bytes the proxy has forwarded; redirect only when it equals link.kept */
};

#endif
