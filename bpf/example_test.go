package bpf_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"

	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/model"
)

// ztunnel embeds capture: it loads it at start (picking up what an earlier
// run pinned), sets the node up, listens on 15001, 15006 and 15008 with
// IP_TRANSPARENT, and hands capture the node's enrolled pods whenever its
// model changes. It closes capture at exit; capture stays in force.
func Example() {
	ctx := context.Background()
	log := slog.Default()
	capture, err := bpf.Load(bpf.Options{Logger: log})
	if errors.Is(err, bpf.ErrUnsupported) {
		log.Error("no eBPF capture on this node; pods must use SOCKS5 on 15080", "err", err)
		return
	}
	if err != nil {
		log.Error("load capture", "err", err)
		return
	}
	defer capture.Close()
	if err := capture.SetupNode(); err != nil {
		log.Error("set up node", "err", err)
		return
	}

	lc := net.ListenConfig{Control: bpf.Transparent}
	for _, addr := range []string{":15001", ":15006", ":15008"} {
		ln, err := lc.Listen(ctx, "tcp4", addr)
		if err != nil {
			log.Error("listen", "err", err)
			return
		}
		defer ln.Close()
		// ... serve ln; the original destination is conn.LocalAddr().
	}

	// On every change of the model's local workloads (and once at start):
	type workload struct {
		Namespace, Name string
		IPs             []netip.Addr
		NsLabels        map[string]string
		Labels          map[string]string
	}
	var local []workload
	var desired []bpf.Pod
	for _, w := range local {
		if model.Enrolled(w.NsLabels, w.Labels) {
			desired = append(desired, bpf.Pod{Name: w.Namespace + "/" + w.Name, IPs: w.IPs})
		}
	}
	if err := capture.Reconcile(ctx, desired); err != nil {
		log.Error("reconcile capture", "err", err)
	}
}
