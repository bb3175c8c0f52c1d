package deployer_test

import (
	"fmt"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/istiod-lite/leader"
)

func elector(r *replica, id string) *leader.Elector {
	return &leader.Elector{
		Client: r.kube, Run: r.ctrl.Start, Identity: id,
		LeaseDuration: 3 * time.Second, RenewDeadline: time.Second, RetryPeriod: 200 * time.Millisecond,
	}
}

// TestLeaderHandover runs two replicas against one Lease: only the leader
// writes; killing it hands over to the other, which finds the waypoint
// converged and writes nothing; a leader cut off from the Lease stops before
// a successor starts.
func TestLeaderHandover(t *testing.T) {
	const name = "waypoint"
	ns := namespace(t, "handover")
	a, b := newReplica(t), newReplica(t)
	ea, eb := elector(a, "a"), elector(b, "b")
	stopA := start(t, ea.Start)
	eventually(t, "a leads", func() (bool, string) { return ea.Leading(), "" })
	start(t, eb.Start)

	createGateway(t, waypoint(ns, name, deployer.WaypointClass))
	eventually(t, "pending", hasCondition(t, ns, name, "Programmed", "False", "Pending"))
	markReady(t, cluster.Client(), ns, name)
	eventually(t, "programmed", hasCondition(t, ns, name, "Programmed", "True", "Programmed"))
	a.settle(t, ns, name)
	if w := b.c.writes(); len(w) != 0 {
		t.Errorf("the standby wrote: %v", w)
	}
	if eb.Leading() {
		t.Fatal("two leaders")
	}
	aWrites := a.c.writes()
	if aWrites["PUT gateways/status"] != 2 {
		t.Errorf("leader's status writes: %v, want 2 (Pending, Programmed)", aWrites)
	}
	rv := getGateway(t, ns, name).ResourceVersion

	// Kill the leader (it releases the Lease once it stopped writing).
	t0 := time.Now()
	stopA()
	eventually(t, "b leads", func() (bool, string) { return eb.Leading(), "" })
	t.Logf("handover after the leader's cancellation: %v", time.Since(t0).Round(time.Millisecond))
	if ea.Leading() {
		t.Error("a still leading after stopping")
	}
	// b read everything and found it converged.
	b.settle(t, ns, name)
	if w := b.c.writes(); len(w) != 0 {
		t.Errorf("the new leader wrote to a converged waypoint: %v", w)
	}
	if got := getGateway(t, ns, name).ResourceVersion; got != rv {
		t.Errorf("gateway status rewritten on handover: resourceVersion %s -> %s", rv, got)
	}
	if w := a.c.writes(); fmt.Sprint(w) != fmt.Sprint(aWrites) {
		t.Errorf("the old leader wrote after stopping: %v -> %v", aWrites, w)
	}

	// b converges a change: a deleted Deployment comes back.
	if err := cluster.Client().AppsV1().Deployments(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "pending again", hasCondition(t, ns, name, "Programmed", "False", "Pending"))
	markReady(t, cluster.Client(), ns, name)
	eventually(t, "programmed again", hasCondition(t, ns, name, "Programmed", "True", "Programmed"))
	b.settle(t, ns, name)
	if w := b.c.writes(); w["PATCH deployments"] != 1 || w["PUT gateways/status"] != 2 || len(w) != 2 {
		t.Errorf("new leader's writes %v, want one Deployment apply and two status writes", w)
	}

	// b is cut off from the Lease: it stops leading within RenewDeadline,
	// before a (started again) can take the expired Lease.
	b.c.cutLeases.Store(true)
	ea2 := elector(a, "a")
	start(t, ea2.Start)
	t1 := time.Now()
	var bLeadingWhenATookOver bool
	eventually(t, "a leads again", func() (bool, string) {
		bl := eb.Leading()
		if ea2.Leading() {
			bLeadingWhenATookOver = bl
			return true, ""
		}
		return false, ""
	})
	t.Logf("takeover from a replica cut off from the Lease: %v", time.Since(t1).Round(time.Millisecond))
	if bLeadingWhenATookOver || eb.Leading() {
		t.Error("the cut-off leader still led when the other took over")
	}
	bWrites := b.c.writes()
	a.settle(t, ns, name)
	if w := a.c.writes(); fmt.Sprint(w) != fmt.Sprint(aWrites) {
		t.Errorf("a wrote to a converged waypoint after taking over: %v -> %v", aWrites, w)
	}
	if w := b.c.writes(); fmt.Sprint(w) != fmt.Sprint(bWrites) {
		t.Errorf("the cut-off replica wrote: %v -> %v", bWrites, w)
	}
}
