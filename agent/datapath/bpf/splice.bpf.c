/* splice.bpf.c: the same-node splice (ARCHITECTURE.md, "Same-node splice").
 *
 * A same-node meshed connection is two TCP connections that end in the node proxy: the accepted
 * client-side socket and the proxy's upstream socket to the local pod. Once policy admitted it
 * and nothing needs to see its bytes, the proxy puts both sockets in these maps and the kernel
 * moves the bytes: every segment that arrives on one socket is handed by nm_splice_verdict (an
 * sk_skb stream verdict program) to the other socket's send side, never reaching user space.
 *
 * Why two sockhashes: the verdict program is attached to nm_splice_sources, and a socket starts
 * being spliced the moment it is inserted there. Both sockets are first inserted in
 * nm_splice_targets (no program: nothing changes for them), so that when either becomes a source
 * its peer is already a valid redirect target; with one map, a segment arriving between the two
 * insertions would have nowhere to go.
 *
 * Why sk_skb and not sk_msg: sk_msg runs when a socket in the map *sends*; here the bytes arrive
 * on the proxy's sockets from the pods and would have to be read by the proxy first. The stream
 * verdict runs on arrival and redirects to the peer's egress (flags 0).
 *
 * nm_splice_links holds, per source socket cookie, its peer's cookie and the bytes redirected so
 * far: telemetry reads them, and the proxy compares them with what the peer's socket took before
 * it forwards a half-close (see agent/proxy/splice.py).
 *
 * Why credits: the kernel queues a redirected segment for the peer's send side without any
 * limit (measured: a client pushed 2 GB towards a server that read nothing). So the proxy grants
 * each socket a limit (nm_splice_credits), which it raises as the peer's TCP takes the bytes.
 * A segment that would go past it is kept on its own socket (SK_PASS), where it counts against
 * the socket's receive buffer, so TCP's window closes on the sender as it would without the
 * splice, and the proxy forwards it itself. Once one segment was kept, every later one is kept
 * too until the proxy has forwarded them all (credit.taken == link.kept): the order of the bytes
 * is kept with it.
 *
 * Why trimming: a retransmitted segment can overlap bytes already passed on, and the verdict sees
 * it whole (nm_splice_trim below); the program cuts the old front off first.
 */
#include <uapi/linux/bpf.h>

#include "nodemesh.h"

/* BCC 0.26 declares bpf_get_socket_cookie as returning u32, which cuts the cookie to its low
 * half; the helper returns the whole u64. */
static u64 (*nm_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

BPF_HASH(nm_splice_links, u64, struct nm_splice_link, NM_SPLICE_MAX_SOCKETS);
BPF_HASH(nm_splice_credits, u64, struct nm_splice_credit, NM_SPLICE_MAX_SOCKETS);
BPF_SOCKHASH(nm_splice_targets, u64, NM_SPLICE_MAX_SOCKETS);
BPF_SOCKHASH(nm_splice_sources, u64, NM_SPLICE_MAX_SOCKETS);

/* The start of struct tcp_skb_cb (net/tcp.h), which TCP keeps in skb->cb while the segment
 * waits in the receive queue: the sequence numbers it covers (end_seq counts a FIN too). */
struct nm_tcp_cb {
    u32 seq;
    u32 end_seq;
};

/* offsetof(struct sk_buff, cb) on 64-bit kernels (next, prev, dev; sk; tstamp; then cb). Not
 * taken from <linux/skbuff.h>: that header floods the compiler's output with warnings. A wrong
 * offset cannot do harm: nm_splice_trim uses what it read only when the numbers describe the
 * skb (end_seq - seq is its length). */
#define NM_SKB_CB_OFFSET 40

/* bpf_skb_adjust_room removes at most this many bytes from the front of an skb per call. */
#define NM_TRIM_STEP 4095
#define NM_TRIM_CALLS 64

/* Cut off the bytes of this segment that were already passed on.
 *
 * A retransmitted segment can start before what the socket already received and end after it
 * (the first copy's acknowledgment was late, and the retransmission spans old and new bytes).
 * TCP queues such a segment whole (tcp_data_queue, "partial packet") and a reader skips the old
 * part by sequence number; but the verdict path hands the program whole skbs (tcp_read_skb
 * reads from the head of the queue without looking at copied_seq), so redirected or kept
 * as they are, the old bytes reach the peer a second time (seen once in a loaded test run:
 * 29,749 bytes of an 8 MiB body twice). The program remembers the sequence number after the
 * last byte it passed on (link->next) and removes what comes before it; link->trimmed counts
 * the bytes removed. Returns 0 when nothing was old, 1 when the skb was cut, -1 when its
 * sequence numbers cannot be read or do not describe it (nothing changed) or cutting failed
 * (an allocation in bpf_skb_adjust_room: the skb may be cut in part). The caller reads
 * skb->len again in every case. */
static __always_inline int nm_splice_trim(struct __sk_buff *skb, struct nm_splice_link *link)
{
    struct nm_tcp_cb cb = {};
    u32 len = skb->len;
    u32 old;

    if (bpf_probe_read_kernel(&cb, sizeof(cb), (void *)((long)skb + NM_SKB_CB_OFFSET)))
        return -1;
    if ((u32)(cb.end_seq - cb.seq - len) > 1) /* not this skb's numbers (len, or len + FIN) */
        return -1;
    old = (link->next & NM_SPLICE_SEQ_SEEN) ? (u32)link->next - cb.seq : 0;
    if ((s32)old <= 0) {
        link->next = NM_SPLICE_SEQ_SEEN | (u32)(cb.seq + len);
        return 0;
    }
    if (old >= len) /* TCP queues no segment that is old throughout; cannot happen */
        return -1;
    for (int i = 0; i < NM_TRIM_CALLS; i++) {
        u32 step = old > NM_TRIM_STEP ? NM_TRIM_STEP : old;

        if (step == 0)
            break;
        if (bpf_skb_adjust_room(skb, -(s32)step, 0, 0))
            return -1;
        old -= step;
        __sync_fetch_and_add(&link->trimmed, step);
    }
    if (old)
        return -1;
    link->next = NM_SPLICE_SEQ_SEEN | (u32)(cb.seq + len);
    return 1;
}

static __always_inline int nm_splice_keep(struct nm_splice_link *link, u32 len)
{
    __sync_fetch_and_add(&link->kept, len);
    return SK_PASS;
}

int nm_splice_verdict(struct __sk_buff *skb)
{
    u64 cookie = nm_socket_cookie(skb);
    struct nm_splice_link *link = nm_splice_links.lookup(&cookie);
    struct nm_splice_credit *credit;
    u32 len = skb->len;

    if (!link)
        return SK_PASS; /* not linked (being taken out): the proxy reads it */
    /* A FIN arrives as an empty skb. Redirected, the peer's send side would take "sent 0 bytes"
     * for a broken pipe and fail the peer with EPIPE. TCP has already recorded the FIN (the
     * proxy sees EOF on this socket and forwards the half-close itself), so the empty skb is
     * only a queue marker: drop it. */
    if (len == 0)
        return SK_DROP;
    nm_splice_trim(skb, link);
    len = skb->len;
    credit = nm_splice_credits.lookup(&cookie);
    if (!credit || credit->taken != link->kept || link->bytes + len > credit->limit)
        return nm_splice_keep(link, len);
    /* No peer (it is being closed): keep the bytes too; dropping them would lose bytes TCP has
     * already acknowledged. */
    if (nm_splice_targets.sk_redirect_hash(skb, &link->peer, 0) != SK_PASS)
        return nm_splice_keep(link, len);
    __sync_fetch_and_add(&link->bytes, len);
    return SK_PASS;
}
