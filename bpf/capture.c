//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// ambit's traffic capture: TCX programs that hand the TCP connections of
// enrolled pods to the node's ztunnel with bpf_sk_assign, keeping the original
// destination in the packet (the ztunnel listens with IP_TRANSPARENT and reads
// it from its accepted socket's local address). Packets that are assigned get
// the capture mark so that the node's policy route ("fwmark -> local table")
// delivers them locally instead of forwarding them.
//
//   pod_ingress    host side of an enrolled pod's veth, ingress: what the pod
//                  sends (IPv4 from another source address is dropped). New
//                  connections go to ztunnel's outbound port;
//                  packets of connections ztunnel holds (its transparent
//                  deliveries, the captured connections) go to its socket.
//                  Also receives, redirected by pod_egress, connections from
//                  other pods of the node to this pod (inbound capture).
//   pod_egress     host side of an enrolled pod's veth, egress: what the node
//                  forwards to the pod (from another pod of the node, or from
//                  an interface without uplink_ingress) is sent back in to
//                  pod_ingress for inbound capture, and so is what the node
//                  itself sends: host-network processes get inbound capture
//                  like any other client, and connections to the pod's port
//                  15008 are ztunnel's tunnels to its own pods. Only two
//                  kinds of the node's own packets go to the pod as they are:
//                  ztunnel's (its sockets carry bypass_mark and are in
//                  ztunnel_cgroups: deliveries, and the connections it
//                  accepted; the mark alone is not enough, any root
//                  container can set it) and kubelet's health probes
//                  (sockets of the cgroups in probe_cgroups, or below).
//   uplink_ingress node uplinks, ingress: connections from other nodes to
//                  enrolled pods go to ztunnel's HBONE port (for port 15008)
//                  or inbound port (any other port); UDP to their port 15008
//                  (HBONE over QUIC) goes to ztunnel's UDP socket on 15008.
//
// Fail closed: when an enrolled pod's new connection finds no ztunnel
// listener, the SYN is turned into a RST sent back where it came from (the
// client sees "connection refused"); segments of unknown connections are
// dropped. Nothing of an enrolled pod's TCP leaves the node unencrypted
// unless ztunnel sends it.
//
// What a pod veth carries: IPv4, IPv6 and ARP frames, untagged. Tagged
// frames (802.1Q, 802.1ad, even with VLAN 0) and any other ethertype are
// dropped in both directions: the kernel strips VLAN 0 tags after TCX has
// run and would route the inner packet unseen.
//
// IPv4 only: IPv6 TCP of enrolled pods is dropped rather than let through.
// IPv6 passes only when its upper-layer protocol is ICMPv6 (neighbour
// discovery, MLD) or UDP, found by walking at most MAX_EXT extension headers
// (hop-by-hop, routing, destination options); fragments, too many headers,
// TCP, and every other protocol (AH, ESP, mobility, unknown ones) are dropped.
// This allowlist is the fail-closed choice: what the walk does not fully
// understand is dropped rather than passed, and the bounded walk with
// bpf_skb_load_bytes keeps the verifier's work small and fixed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in6.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual MIT/GPL";

// TCX verdicts (linux/bpf.h >= 6.6; older uapi headers lack them).
#define TCX_NEXT -1
#define TCX_PASS 0
#define TCX_DROP 2

// Set at load time (see Options in Go).
volatile const __u16 outbound_port = 15001; // host byte order
volatile const __u16 inbound_port = 15006;
volatile const __u16 hbone_port = 15008;
volatile const __u32 capture_mark = 0x100;
volatile const __u32 loop_mark = 0x200; // pod_egress -> pod_ingress
volatile const __u32 bypass_mark = 0x400; // ztunnel's own sockets (SO_MARK)

// A captured pod, by IPv4 address (network byte order).
struct pod {
	__u32 ifindex; // host side of the pod's veth
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct pod);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pods SEC(".maps");

// The cgroups (v2 ids) whose sockets may reach enrolled pods from the node
// directly: kubelet's, for its health probes. A socket in a descendant of
// one matches too.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, __u8);
	__uint(max_entries, 16);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} probe_cgroups SEC(".maps");

// The cgroups (v2 ids) of ztunnel's process: the node's packets that carry
// bypass_mark reach enrolled pods directly only from a socket of one of
// these cgroups (exactly: not below). The mark alone proves nothing: since
// Linux 5.17 SO_MARK needs only CAP_NET_RAW, which root containers have by
// default. ztunnel puts its own cgroup here at start (Options.ZtunnelCgroups).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, __u8);
	__uint(max_entries, 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ztunnel_cgroups SEC(".maps");

// At most this deep a cgroup (the root is level 0) is found in probe_cgroups.
#define MAX_CGROUP_LEVEL 8

enum stat {
	STAT_OUTBOUND,   // new outbound connections given to ztunnel
	STAT_INBOUND,    // new inbound plaintext connections given to ztunnel
	STAT_HBONE,      // new HBONE connections given to ztunnel
	STAT_SOCKET,     // segments of connections ztunnel holds
	STAT_REFUSED,    // SYNs answered with RST: no ztunnel listener
	STAT_DROPPED,    // packets dropped: unknown connection, spoofed, IPv6 TCP, tagged
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

static __always_inline void count(__u32 s) {
	__u64 *v = bpf_map_lookup_elem(&stats, &s);
	if (v)
		*v += 1;
}

struct tcp4 {
	__u8 tcp;      // the rest is valid only for TCP, but for udp and dport
	__u8 udp;      // UDP with its header (IPv4 or IPv6); dport is valid
	__u32 ihl;     // IP header length in bytes
	__u32 saddr;   // network byte order
	__u32 daddr;   // network byte order
	__u16 sport;   // network byte order
	__u16 dport;   // network byte order
	__u8 syn_only; // SYN without ACK: a new connection
	__u8 bare;     // no payload: a control segment (ACK, RST, FIN, SYN)
	__u8 ack_only; // ACK without SYN or RST: it may complete a SYN cookie
};

// What parse found.
enum {
	P_IP4 = 1,     // IPv4: t filled (t->tcp for TCP)
	P_PASS = 0,    // nothing to capture: ARP, IPv6 ICMPv6 or UDP
	P_IP6 = -1,    // IPv6 that is TCP or cannot be told not to be (see ip6_allowed)
	P_HIDDEN = -2, // IPv4 TCP that cannot be inspected (a fragment, or a TCP header
	               // that is not there); saddr and daddr are filled
	P_FOREIGN = -3, // a tagged frame or another ethertype: no pod sends it
};

// At most this many IPv6 extension headers are walked; a packet with more
// is dropped.
#define MAX_EXT 8

// ip6_allowed reports whether an IPv6 packet whose first next-header value is
// nexthdr, with its extension headers from off, carries ICMPv6 or UDP. For
// UDP it sets t->udp and t->dport.
static __always_inline int ip6_allowed(struct __sk_buff *skb, __u32 off, __u8 nexthdr, struct tcp4 *t) {
#pragma unroll
	for (int i = 0; i < MAX_EXT; i++) {
		switch (nexthdr) {
		case IPPROTO_ICMPV6:
			return 1;
		case IPPROTO_UDP: {
			__u16 ports[2];
			if (!bpf_skb_load_bytes(skb, off, ports, sizeof(ports))) {
				t->udp = 1;
				t->dport = ports[1];
			}
			return 1;
		}
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS: {
			__u8 h[2]; // next header, length in 8-octet units beyond the first
			if (bpf_skb_load_bytes(skb, off, h, sizeof(h)))
				return 0;
			nexthdr = h[0];
			off += (h[1] + 1) * 8;
			break;
		}
		default: // TCP, fragments, AH, ESP, no next header, unknown
			return 0;
		}
	}
	return 0;
}

// parse classifies the frame (see the P_ values). Callers drop P_IP6 and
// P_HIDDEN on enrolled pods' paths: what cannot be inspected cannot be
// captured; pod veths also drop P_FOREIGN (see pod_parse).
static __always_inline int parse(struct __sk_buff *skb, struct tcp4 *t) {
	// Headers may lie outside the linear data (a packet socket can send
	// such frames): pull in what is read below, at most the whole packet.
	__u32 want = ETH_HLEN + 60 + sizeof(struct tcphdr);
	if (want > skb->len)
		want = skb->len;
	if ((long)skb->data_end - (long)skb->data < (long)want)
		bpf_skb_pull_data(skb, want);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return P_FOREIGN;
	// skb->protocol is what the stack acts on; it must be the frame's own.
	if (skb->protocol != eth->h_proto)
		return P_FOREIGN;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return P_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return P_IP6;
		return ip6_allowed(skb, ETH_HLEN + sizeof(*ip6), ip6->nexthdr, t) ? P_PASS : P_IP6;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return P_FOREIGN;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return P_FOREIGN;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	if (ip->protocol == IPPROTO_UDP && !(ip->frag_off & bpf_htons(0x1fff))) {
		__u16 ports[2];
		if (!bpf_skb_load_bytes(skb, ETH_HLEN + ip->ihl * 4, ports, sizeof(ports))) {
			t->udp = 1;
			t->dport = ports[1];
		}
	}
	if (ip->protocol != IPPROTO_TCP)
		return P_IP4;
	if (ip->frag_off & bpf_htons(0x3fff)) // more fragments, or an offset
		return P_HIDDEN;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return P_HIDDEN;
	struct tcphdr *tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > end)
		return P_HIDDEN;
	t->tcp = 1;
	t->ihl = ihl;
	t->sport = tcp->source;
	t->dport = tcp->dest;
	t->syn_only = tcp->syn && !tcp->ack;
	t->ack_only = tcp->ack && !tcp->syn && !tcp->rst;
	__u32 hdrs = ihl + tcp->doff * 4;
	t->bare = bpf_ntohs(ip->tot_len) <= hdrs && skb->len <= ETH_HLEN + hdrs;
	return P_IP4;
}

// pod_parse is parse for a pod veth, where tagged frames are foreign too: a
// tag that the kernel took out of the frame before TCX (the outer one of a
// stacked pair, or a lone VLAN 0 tag) still makes a tagged frame.
static __always_inline int pod_parse(struct __sk_buff *skb, struct tcp4 *t) {
	if (skb->vlan_present)
		return P_FOREIGN;
	return parse(skb, t);
}

// lookup finds the socket for the tuple (established first, then listening),
// or NULL. The caller releases it.
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct tcp4 *t, __u16 dport) {
	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = t->saddr;
	tuple.ipv4.daddr = t->daddr;
	tuple.ipv4.sport = t->sport;
	tuple.ipv4.dport = dport;
	return bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
}

// assign hands the packet to sk, releasing it. It returns 0 on success.
static __always_inline long assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 s) {
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return err;
	skb->mark |= capture_mark;
	count(s);
	return 0;
}

// to_socket hands the packet to the local socket of its connection, if
// there is one that is not a listener. It returns 1 when it did.
static __always_inline int to_socket(struct __sk_buff *skb, struct tcp4 *t) {
	struct bpf_sock *sk = lookup(skb, t, t->dport);
	if (!sk)
		return 0;
	if (sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return 0;
	}
	return assign(skb, sk, STAT_SOCKET) == 0;
}

// has_socket reports whether the connection has a local socket that is not a
// listener.
static __always_inline int has_socket(struct __sk_buff *skb, struct tcp4 *t) {
	struct bpf_sock *sk = lookup(skb, t, t->dport);
	if (!sk)
		return 0;
	int ok = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return ok;
}

// to_listener hands a SYN to ztunnel's listener on port. It returns 1 when
// it did.
static __always_inline int to_listener(struct __sk_buff *skb, struct tcp4 *t, __u16 port, __u32 s) {
	struct bpf_sock *sk = lookup(skb, t, bpf_htons(port));
	if (!sk)
		return 0;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return 0;
	}
	return assign(skb, sk, s) == 0;
}

// to_cookie_listener hands an ACK of a connection with no socket to
// ztunnel's listener on port: the listener answered its SYN with a SYN
// cookie (no request socket remains), and the kernel checks the cookie and
// makes the connection, or answers with a RST as for any stray ACK. It
// returns 1 when it did.
static __always_inline int to_cookie_listener(struct __sk_buff *skb, struct tcp4 *t, __u16 port) {
	return t->ack_only && to_listener(skb, t, port, STAT_SOCKET);
}

static __always_inline __u16 csum_fold(__s64 sum) {
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

struct pseudo_hdr {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
};

// refuse turns the segment into a RST to its sender; RSTs are dropped. Either
// way the segment does not go on. The RST goes back out of the interface the
// segment came in on (peer: a pod veth, where it goes straight into the
// pod's namespace, so that pod_egress needs no way to tell it from a host
// process's packet), or, for a segment that pod_egress looped back (routed),
// where the node's routes send it.
static __always_inline int refuse(struct __sk_buff *skb, int routed, int peer) {
	struct ethhdr eth;
	struct iphdr ip;
	struct tcphdr tcp;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)))
		goto drop;
	__u32 ihl = ip.ihl * 4;
	if (ihl < sizeof(ip) || ihl > 60 ||
	    bpf_skb_load_bytes(skb, sizeof(eth) + ihl, &tcp, sizeof(tcp)) || tcp.rst)
		goto drop;
	__u32 paylen = bpf_ntohs(ip.tot_len) - ihl - tcp.doff * 4;

	struct ethhdr reth = {};
	__builtin_memcpy(reth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(reth.h_source, eth.h_dest, ETH_ALEN);
	reth.h_proto = bpf_htons(ETH_P_IP);

	struct iphdr rip = {};
	rip.version = 4;
	rip.ihl = 5;
	rip.tot_len = bpf_htons(sizeof(rip) + sizeof(tcp));
	rip.frag_off = bpf_htons(0x4000); // DF
	rip.ttl = 64;
	rip.protocol = IPPROTO_TCP;
	rip.saddr = ip.daddr;
	rip.daddr = ip.saddr;
	rip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&rip, sizeof(rip), 0));

	struct tcphdr rtcp = {};
	rtcp.source = tcp.dest;
	rtcp.dest = tcp.source;
	rtcp.doff = 5;
	rtcp.rst = 1;
	if (tcp.ack) {
		rtcp.seq = tcp.ack_seq;
	} else {
		rtcp.ack = 1;
		rtcp.ack_seq = bpf_htonl(bpf_ntohl(tcp.seq) + paylen + tcp.syn + tcp.fin);
	}
	struct pseudo_hdr ph = {
		.saddr = rip.saddr,
		.daddr = rip.daddr,
		.proto = IPPROTO_TCP,
		.len = bpf_htons(sizeof(rtcp)),
	};
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	rtcp.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&rtcp, sizeof(rtcp), sum));

	__u32 len = sizeof(reth) + sizeof(rip) + sizeof(rtcp);
	if (bpf_skb_change_tail(skb, len, 0) ||
	    bpf_skb_store_bytes(skb, 0, &reth, sizeof(reth), 0) ||
	    bpf_skb_store_bytes(skb, sizeof(reth), &rip, sizeof(rip), 0) ||
	    bpf_skb_store_bytes(skb, sizeof(reth) + sizeof(rip), &rtcp, sizeof(rtcp), 0))
		goto drop;
	if (routed) {
		struct bpf_fib_lookup fib = {};
		fib.family = 2; // AF_INET
		fib.l4_protocol = IPPROTO_TCP;
		fib.tot_len = len - sizeof(reth);
		fib.ifindex = skb->ifindex;
		fib.ipv4_src = rip.saddr;
		fib.ipv4_dst = rip.daddr;
		if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH) != BPF_FIB_LKUP_RET_SUCCESS)
			goto drop; // e.g. to the node itself: nothing to refuse for
		struct bpf_redir_neigh nh = {.nh_family = 2, .ipv4_nh = fib.ipv4_dst};
		count(STAT_REFUSED);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	count(STAT_REFUSED);
	if (peer) // straight into the pod, not through pod_egress
		return bpf_redirect_peer(skb->ifindex, 0);
	return bpf_redirect(skb->ifindex, 0);
drop:
	count(STAT_DROPPED);
	return TCX_DROP;
}

static __always_inline int drop(void) {
	count(STAT_DROPPED);
	return TCX_DROP;
}

// inbound captures a segment addressed to a local enrolled pod.
static __always_inline int inbound(struct __sk_buff *skb, struct tcp4 *t, int routed) {
	if (to_socket(skb, t))
		return TCX_PASS;
	if (!t->syn_only) {
		__u16 port = t->dport == bpf_htons(hbone_port) ? hbone_port : inbound_port;
		if (to_cookie_listener(skb, t, port))
			return TCX_PASS;
		return drop();
	}
	if (t->dport == bpf_htons(hbone_port)) {
		if (to_listener(skb, t, hbone_port, STAT_HBONE))
			return TCX_PASS;
	} else if (to_listener(skb, t, inbound_port, STAT_INBOUND)) {
		return TCX_PASS;
	}
	return refuse(skb, routed, 0);
}

SEC("tcx/ingress")
int pod_ingress(struct __sk_buff *skb) {
	struct tcp4 t = {};
	int r = pod_parse(skb, &t);
	if (r < 0)
		return drop();
	if (r == P_PASS)
		return TCX_NEXT;

	if (skb->mark & loop_mark) { // looped back by pod_egress: inbound
		skb->mark &= ~loop_mark;
		if (!t.tcp)
			return drop();
		return inbound(skb, &t, 1);
	}
	struct pod *p = bpf_map_lookup_elem(&pods, &t.saddr);
	if (!p || p->ifindex != skb->ifindex) // not the pod's address
		return drop();
	if (!t.tcp)
		return TCX_NEXT;
	if (to_socket(skb, &t))
		return TCX_PASS;
	if (!t.syn_only) {
		if (to_cookie_listener(skb, &t, outbound_port))
			return TCX_PASS;
		return drop();
	}
	if (to_listener(skb, &t, outbound_port, STAT_OUTBOUND))
		return TCX_PASS;
	return refuse(skb, 0, 1);
}

// is_probe reports whether the node's packet comes from a socket in one of
// probe_cgroups (or below).
static __always_inline int is_probe(struct __sk_buff *skb) {
#pragma unroll
	for (int level = 1; level <= MAX_CGROUP_LEVEL; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
		if (!id)
			return 0; // deeper than the socket's cgroup, or no socket
		if (bpf_map_lookup_elem(&probe_cgroups, &id))
			return 1;
	}
	return 0;
}

// is_ztunnel reports whether the node's packet comes from one of ztunnel's
// sockets: it carries bypass_mark and its socket (for a SYN-ACK, the
// listener of its request socket) is in one of ztunnel_cgroups.
//
// The kernel also answers for ztunnel's sockets without them: a SYN cookie
// (under a SYN flood or an overflowing accept queue) is sent with no socket,
// and time-wait ACKs and RSTs from a kernel control socket in the root
// cgroup. Each carries the mark of the socket it answers for (the
// listener's, the time-wait socket's) and no payload. Such a packet, marked
// and without a socket of a cgroup below the root, goes to the pod as it is
// when it carries no data and does not open a connection (not a bare SYN):
// it cannot deliver a byte, and a host process outside the root cgroup
// that sets the mark on its own socket (CAP_NET_RAW is enough since Linux
// 5.17) still has its cgroup on its packets. Dropping them instead stalls
// the pod's connections under a connection storm (cookie SYN-ACKs lost, SYN
// retransmitted after 1 s, 3 s, ...) and leaves closes unfinished.
static __always_inline int is_ztunnel(struct __sk_buff *skb, struct tcp4 *t) {
	if (!bypass_mark || (skb->mark & bypass_mark) != bypass_mark)
		return 0;
	__u64 id = bpf_skb_cgroup_id(skb);
	if (id && bpf_map_lookup_elem(&ztunnel_cgroups, &id))
		return 1;
	if (!t->bare || t->syn_only)
		return 0;
	return !id || id == bpf_skb_ancestor_cgroup_id(skb, 0);
}

SEC("tcx/egress")
int pod_egress(struct __sk_buff *skb) {
	struct tcp4 t = {};
	int r = pod_parse(skb, &t);
	if (r < 0)
		return drop();
	if (r == P_PASS || !t.tcp) {
		// UDP to port 15008 is HBONE over QUIC, ztunnel's: the uplink
		// gives it to ztunnel's socket (udp_to_hbone). What comes another
		// way (this node's pods and processes, IPv6) reaches no enrolled
		// pod, as TCP to 15008 reaches only ztunnel.
		if (t.udp && t.dport == bpf_htons(hbone_port))
			return drop();
		return TCX_NEXT;
	}
	// The node's own packets carry their socket or were not received on any
	// interface. ztunnel's (bypass_mark from a socket of ztunnel_cgroups:
	// its deliveries, the connections it accepted) and kubelet's probes go to the pod as they are, except HBONE:
	// ztunnel's tunnels to a pod of its own node go to its own HBONE
	// listener like those from other nodes. Every other host process gets
	// inbound capture, as a client on another node would: a host-network
	// pod is no more trusted than any other.
	if (skb->sk || skb->ingress_ifindex == 0) {
		if (t.dport == bpf_htons(hbone_port)) {
			// A tunnel starts with a SYN and goes on with a socket of
			// ztunnel's on the other end; what else goes to port 15008 is
			// a reply to a pod that happens to use it as its client port.
			if (!t.syn_only && !has_socket(skb, &t))
				return TCX_NEXT;
		} else if (is_ztunnel(skb, &t)) {
			return TCX_NEXT;
		} else if (is_probe(skb)) {
			return TCX_NEXT;
		}
	}
	// Send it back in through this veth, addressed to the node (the source
	// MAC is this veth's own), where pod_ingress captures it.
	__u8 mac[ETH_ALEN];
	if (bpf_skb_load_bytes(skb, ETH_ALEN, mac, ETH_ALEN) ||
	    bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0))
		return drop();
	// The mark tells pod_ingress where the packet comes from; a pod cannot
	// forge it (crossing a veth into another namespace clears the mark).
	skb->mark |= loop_mark;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

// udp_to_hbone hands a UDP datagram from another node to <enrolled pod
// IP>:15008 (HBONE over HTTP/3) to ztunnel's UDP socket on that port (bound
// with IP_TRANSPARENT; it reads the pod IP from the datagram's packet info),
// as inbound does for TCP 15008. It returns 1 when it did, 0 when the
// datagram is not UDP to port 15008 (a later fragment has no header: QUIC
// never fragments), -1 when it is but ztunnel has no such socket: the
// caller drops it (fail closed; the client falls back to HTTP/2).
static __always_inline int udp_to_hbone(struct __sk_buff *skb) {
	struct iphdr ip;
	struct udphdr udp;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.protocol != IPPROTO_UDP)
		return 0;
	__u32 ihl = ip.ihl * 4;
	if (ihl < sizeof(ip) || (ip.frag_off & bpf_htons(0x1fff)))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + ihl, &udp, sizeof(udp)) || udp.dest != bpf_htons(hbone_port))
		return 0;
	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = ip.saddr;
	tuple.ipv4.daddr = ip.daddr;
	tuple.ipv4.sport = udp.source;
	tuple.ipv4.dport = udp.dest;
	struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return -1;
	skb->mark |= capture_mark;
	return 1;
}

SEC("tcx/ingress")
int uplink_ingress(struct __sk_buff *skb) {
	struct tcp4 t = {};
	int r = parse(skb, &t);
	if (r == P_HIDDEN && bpf_map_lookup_elem(&pods, &t.daddr))
		return drop(); // uninspectable TCP to an enrolled pod
	if (r == P_IP4 && !t.tcp && bpf_map_lookup_elem(&pods, &t.daddr)) {
		int u = udp_to_hbone(skb); // HBONE over QUIC
		if (u > 0)
			return TCX_PASS;
		if (u < 0)
			return drop();
	}
	// Anything else that is not IPv4 TCP goes on: pod_egress filters what
	// is routed to an enrolled pod.
	if (r != P_IP4 || !t.tcp)
		return TCX_NEXT;
	if (!bpf_map_lookup_elem(&pods, &t.daddr))
		return TCX_NEXT;
	return inbound(skb, &t, 0);
}

// ---------------------------------------------------------------------------
// Guard (cgroup setsockopt, attached at the root cgroup): the two ways a
// process of the node can put frames on an enrolled pod's veth without
// passing its egress hook, where pod_egress runs. An AF_PACKET socket with
// PACKET_QDISC_BYPASS and an AF_XDP socket both transmit with
// dev_direct_xmit, past the qdisc layer and TCX egress: a host-network
// process with CAP_NET_RAW could complete a handshake with an enrolled pod
// in plaintext, past inbound capture and STRICT. In the node's network
// namespace, the guard refuses (EPERM) turning PACKET_QDISC_BYPASS on, and
// (unless allow_af_xdp) registering an AF_XDP socket's UMEM or rings, which
// it cannot send without. Nothing of ambit needs either. Other namespaces
// (the pods' own) are left alone: a pod's frames enter the node through
// pod_ingress whatever way they were sent.

#define SOL_PACKET 263
#define PACKET_QDISC_BYPASS 20
#define SOL_XDP 283

// The node's network namespace (its cookie, SO_NETNS_COOKIE), and whether
// AF_XDP stays allowed in it; set at load time.
volatile const __u64 node_netns_cookie = 0;
volatile const __u8 allow_af_xdp = 0;

SEC("cgroup/setsockopt")
int sockopt_guard(struct bpf_sockopt *ctx) {
	int level = ctx->level;
	if (level != SOL_PACKET && level != SOL_XDP)
		return 1;
	if (level == SOL_PACKET && ctx->optname != PACKET_QDISC_BYPASS)
		return 1;
	if (level == SOL_XDP && allow_af_xdp)
		return 1;
	if (bpf_get_netns_cookie(ctx) != node_netns_cookie)
		return 1;
	return 0; // EPERM
}
