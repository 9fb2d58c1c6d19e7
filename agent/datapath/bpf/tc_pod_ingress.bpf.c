/* tc ingress on a local pod's host-side veth: the pod's outgoing traffic.
 *
 *  - TCP SYN from a meshed pod (arriving on its own veth) to a port it does not exclude
 *    -> the outbound listener, unless the destination is link-local (see nm_link_local);
 *  - TCP SYN from a pod that is not meshed to a meshed local pod, port not excluded by the
 *    destination -> the inbound plaintext listener;
 *  - later segments of a flow the node owns -> that flow's socket;
 *  - TCP fragments from a meshed pod or to one -> dropped (see nm_parse);
 *  - everything else (non-TCP, IPv6 for now, flows between pods outside the mesh) is untouched.
 */
#include "capture.h"

int nm_pod_ingress(struct __sk_buff *skb)
{
    struct nm_segment seg = {};
    int kind = nm_parse(skb, &seg);
    if (kind < 0 || skb->mark == NM_PROXY_MARK)
        return TC_ACT_OK;

    struct nm_pod *src = nm_pod_of(seg.tuple.ipv4.saddr);
    int src_meshed = src && (src->flags & NM_POD_MESHED) && src->ifindex == skb->ifindex;
    struct nm_pod *dst = nm_pod_of(seg.tuple.ipv4.daddr);
    int dst_meshed = dst && (dst->flags & NM_POD_MESHED);
    if (!src_meshed && !dst_meshed)
        return TC_ACT_OK;
    if (kind == NM_FRAGMENT) {
        nm_count(NM_PROG_POD_INGRESS, NM_CNT_FRAGMENT);
        return TC_ACT_SHOT;
    }

    if (!seg.syn_only) {
        if (nm_assign_owner(skb, &seg)) {
            nm_count(NM_PROG_POD_INGRESS, NM_CNT_OWNED);
            return TC_ACT_OK;
        }
        nm_count(NM_PROG_POD_INGRESS, NM_CNT_PASSED);
        return TC_ACT_OK;
    }
    if (src_meshed) {
        if (nm_port_listed(src->exclude_out, seg.dport) || nm_link_local(seg.tuple.ipv4.daddr)) {
            nm_count(NM_PROG_POD_INGRESS, NM_CNT_EXEMPT);
            return TC_ACT_OK;
        }
        return nm_steer(skb, &seg, NM_PROG_POD_INGRESS, NM_LISTENER_OUTBOUND);
    }
    if (nm_port_listed(dst->exclude_in, seg.dport)) {
        nm_count(NM_PROG_POD_INGRESS, NM_CNT_EXEMPT);
        return TC_ACT_OK;
    }
    return nm_steer(skb, &seg, NM_PROG_POD_INGRESS, NM_LISTENER_INBOUND);
}
