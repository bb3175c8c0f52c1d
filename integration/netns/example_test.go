package netns_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// Two nodes with a pod each; a connection from one pod to the other, with a
// packet capture on the first node's uplink.
func Example() {
	topo, err := netns.Build(netns.Config{Nodes: []netns.NodeConfig{
		{Name: "node1", Pods: []string{"client"}},
		{Name: "node2", Pods: []string{"server"}},
	}})
	if err != nil {
		panic(err)
	}
	defer topo.Close()
	ctx := context.Background()
	server, client := topo.Pod("server"), topo.Pod("client")

	ln, err := server.NS.Listen(ctx, nil, "tcp", ":80")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
	}()

	pcap, err := topo.Node("node1").NS.StartCapture(netns.Uplink, filepath.Join("/tmp", "example.pcap"), "tcp")
	if err != nil {
		panic(err)
	}
	c, err := client.NS.Dial(ctx, nil, "tcp", net.JoinHostPort(server.IP.String(), "80"))
	if err != nil {
		panic(err)
	}
	c.Close()
	pkts, err := pcap.Stop()
	if err != nil {
		panic(err)
	}
	fmt.Println(pkts[0].Src.Addr(), "->", pkts[0].Dst, pkts[0].Flags&netns.SYN != 0)
}
