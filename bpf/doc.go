// Package bpf captures the TCP traffic of enrolled pods in the kernel and
// hands it to the node's ztunnel.
//
// Three TCX programs (capture.c, built with bpf2go; the generated Go and
// object files are committed) steer packets with bpf_sk_assign to ztunnel's
// listeners in the node's network namespace, keeping the original
// destination in the packet: a pod's outbound connections go to ztunnel's
// port 15001, connections to a pod's port 15008 go to ztunnel's 15008, any
// other connection to a pod goes to 15006. Packets of connections that
// ztunnel holds (its transparent deliveries to pods, the captured
// connections) are matched to its sockets first. The node's own connections
// to pods are captured like any client's (15006, or 15008 for port 15008:
// ztunnel's tunnels to its own pods): a host-network process gets no more
// than a pod on another node. Only ztunnel's own packets (their socket mark
// has Options.BypassMark and the socket is in one of
// Options.ZtunnelCgroups), the kernel's payload-free answers for ztunnel's
// sockets (SYN cookies, time-wait ACKs and RSTs: the mark, no socket below
// the root cgroup, no data, not a SYN) and kubelet's health probes (sockets
// of the cgroups of Options.ProbeCgroups) reach a pod directly. The ACK
// that completes a SYN cookie handshake goes to ztunnel's listener, which
// checks the cookie. When no ztunnel
// listens, a new connection is refused with a RST that the program builds;
// nothing leaves unencrypted.
//
// A Capture loads the programs and pins their links and maps in bpffs, so
// capture outlives the process: a ztunnel restart neither detaches capture
// nor lets traffic bypass it, and the next Load picks the pinned state up
// without re-enrolling pods. Pods are captured one by one (AddPod, RemovePod)
// or as a whole (Reconcile), for the pods model.Enrolled puts in the mesh.
// Uninstall removes everything.
//
// What ztunnel must do:
//   - listen on 0.0.0.0:15001, :15006 and :15008 with IP_TRANSPARENT (all
//     three: the accepted sockets' local address is the pod's or the original
//     destination, not the node's; Transparent sets it); the original
//     destination is the accepted connection's LocalAddr;
//   - mark its sockets, the three listeners included (accepted connections
//     inherit the mark), with BypassMark (SO_MARK);
//   - deliver to local pods either from its own address or, to keep the
//     client's address, with IP_TRANSPARENT and a bind to it; it may send a
//     pod's plain TCP to destinations outside the mesh from the pod's
//     address the same way (replies are matched to its socket like those
//     of deliveries), except to the node's own addresses;
//   - refuse a captured connection whose original destination is one of its
//     own listeners (a loop);
//   - close the connections it holds for a pod before RemovePod (or the
//     Reconcile that drops the pod): once released, the pod's packets are no
//     longer matched to ztunnel's sockets and would go out as they are.
//
// Node-wide, SetupNode adds the rule "fwmark Mark/Mark lookup RouteTable"
// and the route "local 0.0.0.0/0 dev lo table RouteTable" (so that assigned
// packets are delivered locally), attaches the inbound program to the
// uplinks, and turns off TCP early demux (net.ipv4.tcp_early_demux=0: early
// demux would hand a packet from one local pod to another to ztunnel's
// socket before routing, and forwarding then drops it). Per pod, AddPod sets
// accept_local on the pod's host veth (ztunnel's tunnels to its own pods come
// back in from the node's address). It uses iproute2 for rules and routes.
//
// A pod veth carries only untagged IPv4, IPv6 and ARP frames: tagged frames
// (802.1Q, 802.1ad) and other ethertypes are dropped, since the kernel
// strips VLAN 0 tags after TCX and would route the inner packet unseen.
//
// IPv4 only: the IPv6 TCP of an enrolled pod is dropped. IPv6 passes only
// when its upper-layer protocol is ICMPv6 or UDP, found by walking a bounded
// chain of extension headers (hop-by-hop, routing, destination options);
// fragments, longer chains and every other protocol are dropped.
//
// Pods are captured only on a veth whose peer lives in another network
// namespace and to which a /32 (/128) scope-link route leads for the pod's
// address; never on an uplink, the default route's device or lo. A pod
// without such a veth (its veth is gone while the model still lists it) is
// skipped with an error wrapping ErrNoPodVeth and listed by Skipped.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -type pod capture capture.c -- -O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu
