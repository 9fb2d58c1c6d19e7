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
