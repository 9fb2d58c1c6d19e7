/* capture.h: the maps and the steering helpers both tc programs share.
 *
 * Both programs are compiled in one BCC module (agent/datapath/programs.py includes the two
 * .bpf.c files into one unit) so they share one instance of every map.
 *
 * Steering follows the recipe in shared/notes/DATAPATH.md: a SYN that must be captured is handed
 * to a transparent listener with bpf_sk_assign; any other segment of a flow the node already owns
 * is handed to its own socket. Both get NM_CAPTURE_MARK so that the policy-routing rule
 * (fwmark -> table with "local 0.0.0.0/0 dev lo") delivers them locally; without it the kernel
 * would forward the packet and the assigned socket would never see it.
 */
#ifndef NM_CAPTURE_H
#define NM_CAPTURE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#include "nodemesh.h"

BPF_HASH(nm_pods, struct nm_addr, struct nm_pod, 4096);
BPF_ARRAY(nm_settings, struct nm_settings, 1);
BPF_PERCPU_ARRAY(nm_counters, u64, NM_PROG_COUNT * NM_COUNTER_COUNT);

/* BCC's BPF_SOCKMAP has no lookup member, and a raw &map is not rewritten to a map fd, so the
 * table struct is declared by hand (see DATAPATH.md). A lookup from tc returns a referenced
 * socket that must be released. */
struct nm_listeners_table_t {
    u32 key;
    int leaf;
    struct bpf_sock *(*lookup)(u32 *);
    int (*update)(u32 *, int *);
    int (*delete)(u32 *);
    u32 max_entries;
    int flags;
};
__attribute__((section("maps/sockmap"))) struct nm_listeners_table_t nm_listeners = {
    .max_entries = NM_LISTENER_COUNT};
BPF_ANNOTATE_KV_PAIR(nm_listeners, u32, int);

/* The fields of one TCP/IPv4 segment the decision needs. */
struct nm_segment {
    struct bpf_sock_tuple tuple; /* network order, as the lookup helpers want */
    u16 dport;                   /* host order */
    u8 syn_only;                 /* SYN without ACK: a new connection attempt */
};

static __always_inline void nm_count(u32 prog, u32 counter)
{
    u32 idx = prog * NM_COUNTER_COUNT + counter;
    u64 *value = nm_counters.lookup(&idx);
    if (value)
        *value += 1;
}

/* What nm_parse found. */
#define NM_SEGMENT 0  /* an unfragmented TCP/IPv4 segment: seg is filled */
#define NM_FRAGMENT 1 /* a fragment of a TCP/IPv4 packet: only seg's addresses are filled */

/* NM_SEGMENT or NM_FRAGMENT; -1 for anything else, which the programs leave alone.
 *
 * Why fragments are their own kind: tc runs before the kernel reassembles, and a first fragment
 * may hold only the first 8 bytes of the TCP header (RFC 1858's tiny fragment), so its flags
 * cannot be read here. Left alone, the pod at the other end reassembled a SYN that no listener
 * saw: a connection past the mesh. TCP never needs fragments (DF, segments sized to the path),
 * so the programs drop the fragments of meshed pods' traffic instead. */
static __always_inline int nm_parse(struct __sk_buff *skb, struct nm_segment *seg)
{
    struct iphdr ip;
    struct {
        __be16 source;
        __be16 dest;
        __be32 seq;
        __be32 ack_seq;
        u8 doff_res;
        u8 flags;
    } tcp;

    if (skb->protocol != bpf_htons(ETH_P_IP))
        return -1;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return -1;
    if (ip.protocol != IPPROTO_TCP || ip.ihl < 5)
        return -1;
    seg->tuple.ipv4.saddr = ip.saddr;
    seg->tuple.ipv4.daddr = ip.daddr;
    /* More fragments (0x2000) or a fragment offset: a piece of a packet, not a segment. */
    if (ip.frag_off & bpf_htons(0x3FFF))
        return NM_FRAGMENT;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)) < 0)
        return -1;
    seg->tuple.ipv4.sport = tcp.source;
    seg->tuple.ipv4.dport = tcp.dest;
    seg->dport = bpf_ntohs(tcp.dest);
    /* TCP flags byte: FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10 */
    seg->syn_only = (tcp.flags & 0x12) == 0x02;
    return NM_SEGMENT;
}

static __always_inline struct nm_pod *nm_pod_of(__be32 addr)
{
    struct nm_addr key = {.family = NM_AF_INET, .addr = {addr, 0, 0, 0}};
    return nm_pods.lookup(&key);
}

/* 169.254.0.0/16, where clouds serve instance metadata (and the node's credentials). Never a
 * meshed pod, so the mesh adds nothing there; captured, the node proxy would make the
 * connection from the node's own namespace and address, past whatever holds pods back from it
 * (firewall rules on pod addresses, IMDSv2's hop limit of 1). Left to the pod's own path. */
static __always_inline int nm_link_local(__be32 addr)
{
    return (bpf_ntohl(addr) & 0xFFFF0000) == 0xA9FE0000;
}

static __always_inline int nm_port_listed(const __u16 *ports, u16 port)
{
#pragma unroll
    for (int i = 0; i < NM_MAX_EXCLUDED_PORTS; i++) {
        if (ports[i] == port)
            return 1;
    }
    return 0;
}

/* Hand a non-SYN segment to the node socket that owns its flow (an accepted proxy connection,
 * or an upstream connection of the proxy). Returns 1 when assigned. Listeners are skipped: a
 * segment that is not a SYN never belongs to one. */
static __always_inline int nm_assign_owner(struct __sk_buff *skb, struct nm_segment *seg)
{
    struct bpf_sock *sk =
        bpf_skc_lookup_tcp(skb, &seg->tuple, sizeof(seg->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    if (sk->state == BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return 0;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return 0;
    skb->mark = NM_CAPTURE_MARK;
    return 1;
}

/* A SYN whose 4-tuple a TIME_WAIT socket of this node still holds. The proxy's side of a
 * captured connection lives in this namespace with the tuple the client sees; when the proxy
 * closed first it waits out TIME_WAIT here (60 s), while the client's namespace holds nothing
 * for the tuple, so the client may reuse its source port. Assigned to a listener, such a SYN
 * skips the TIME_WAIT rules and the kernel refuses the connection request (the tuple is
 * taken): every retransmission is dropped until TIME_WAIT ends, and the client times out.
 * Handed to the TIME_WAIT socket instead, it gets the kernel's usual answer: given to the
 * listener of its destination (ours for the HBONE port: accepted at once), or else an ACK that
 * draws the client's RST, which ends the TIME_WAIT, and the client's SYN, which a SYN_SENT
 * socket answered with such an ACK retransmits at once, reaches our listener (a few
 * milliseconds in all). Not when a listener other than ours holds the destination address and
 * port (a service of the node itself): the kernel would give it the pod's SYN, past the mesh,
 * so the SYN goes to our listener as before and waits for TIME_WAIT to end. Returns 1 when
 * handed over. */
static __always_inline int nm_reopen_time_wait(struct __sk_buff *skb, struct nm_segment *seg,
                                               struct bpf_sock *listener)
{
    struct bpf_sock *tw =
        bpf_skc_lookup_tcp(skb, &seg->tuple, sizeof(seg->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!tw)
        return 0;
    if (tw->state != BPF_TCP_TIME_WAIT) {
        bpf_sk_release(tw);
        return 0;
    }
    struct bpf_sock_tuple dst = seg->tuple;
    dst.ipv4.sport = 0; /* no connection has remote port 0: only a listener can match */
    struct bpf_sock *other =
        bpf_skc_lookup_tcp(skb, &dst, sizeof(dst.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (other) {
        int ours = other->src_port == listener->src_port;
        bpf_sk_release(other);
        if (!ours) {
            bpf_sk_release(tw);
            return 0;
        }
    }
    long err = bpf_sk_assign(skb, tw, 0);
    bpf_sk_release(tw);
    return !err;
}

/* Hand a SYN to one of the agent's listeners. With no listener registered (agent down or
 * restarting) the mesh fails closed: the SYN is dropped and the client's TCP retries it, so a
 * restarted agent picks the connection up; fail-open lets it through uncaptured instead. */
static __always_inline int nm_steer(struct __sk_buff *skb, struct nm_segment *seg, u32 prog,
                                    u32 slot)
{
    struct bpf_sock *sk = nm_listeners.lookup(&slot);
    long err = -1;
    int time_wait = 0;
    if (sk) {
        time_wait = nm_reopen_time_wait(skb, seg, sk);
        err = time_wait ? 0 : bpf_sk_assign(skb, sk, 0);
        bpf_sk_release(sk);
    }
    if (!err) {
        skb->mark = NM_CAPTURE_MARK;
        nm_count(prog, time_wait ? NM_CNT_TIME_WAIT : NM_CNT_CAPTURED);
        return TC_ACT_OK;
    }
    u32 zero = 0;
    struct nm_settings *settings = nm_settings.lookup(&zero);
    if (settings && (settings->flags & NM_SETTING_FAIL_OPEN)) {
        nm_count(prog, NM_CNT_FAILED_OPEN);
        return TC_ACT_OK;
    }
    nm_count(prog, NM_CNT_FAILED_CLOSED);
    return TC_ACT_SHOT;
}

#endif
