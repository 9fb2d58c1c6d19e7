/* tc ingress on the node's uplink(s): traffic arriving from other nodes.
 *
 *  - TCP SYN to a meshed local pod -> the HBONE listener when the destination port is
 *    the HBONE port, else the inbound plaintext listener, unless the pod excludes the
 *    port;
 *  - later segments of those flows -> their own socket;
 *  - TCP fragments to a meshed local pod -> dropped (see nm_parse);
 *  - everything else, including traffic to the node itself, is untouched.
 */
#include "capture.h"

int nm_uplink_ingress(struct __sk_buff *skb)
{
    struct nm_segment seg = {};
    int kind = nm_parse(skb, &seg);
    if (kind < 0 || skb->mark == NM_PROXY_MARK)
        return TC_ACT_OK;

    struct nm_pod *dst = nm_pod_of(seg.tuple.ipv4.daddr);
    if (!dst || !(dst->flags & NM_POD_MESHED))
        return TC_ACT_OK;
    if (kind == NM_FRAGMENT) {
        nm_count(NM_PROG_UPLINK_INGRESS, NM_CNT_FRAGMENT);
        return TC_ACT_SHOT;
    }

    if (!seg.syn_only) {
        if (nm_assign_owner(skb, &seg)) {
            nm_count(NM_PROG_UPLINK_INGRESS, NM_CNT_OWNED);
            return TC_ACT_OK;
        }
        nm_count(NM_PROG_UPLINK_INGRESS, NM_CNT_PASSED);
        return TC_ACT_OK;
    }
    if (nm_port_listed(dst->exclude_in, seg.dport)) {
        nm_count(NM_PROG_UPLINK_INGRESS, NM_CNT_EXEMPT);
        return TC_ACT_OK;
    }
    u32 slot = seg.dport == NM_HBONE_PORT ? NM_LISTENER_HBONE : NM_LISTENER_INBOUND;
    return nm_steer(skb, &seg, NM_PROG_UPLINK_INGRESS, slot);
}
