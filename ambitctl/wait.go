package ambitctl

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// readiness is one object a wait is for.
type readiness struct {
	object string // "Deployment ambit-system/istiod-lite"
	want   string // "Available=True, all replicas updated" (what the wait is for)
	// check reports whether the object is ready and, if not, its current
	// state as a short phrase naming the condition ("Available not reported,
	// 0/1 replicas available").
	check func(ctx context.Context) (ready bool, state string, err error)
}

// waiter polls readinesses, printing progress lines to Out.
type waiter struct {
	Out      io.Writer
	Timeout  time.Duration
	Interval time.Duration // default 1s
	// Heartbeat repeats an unchanged progress line this often (default 5s).
	Heartbeat time.Duration
}

// wait returns once every item is ready, or an error naming the first that
// is not when the timeout passes.
func (w waiter) wait(ctx context.Context, items []readiness) error {
	interval, heartbeat := w.Interval, w.Heartbeat
	if interval <= 0 {
		interval = time.Second
	}
	if heartbeat <= 0 {
		heartbeat = 5 * time.Second
	}
	start := time.Now()
	deadline := time.NewTimer(w.Timeout)
	defer deadline.Stop()
	type progress struct {
		state   string
		printed time.Time
		done    bool
	}
	ps := make([]progress, len(items))
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		pending := 0
		for i, it := range items {
			if ps[i].done {
				continue
			}
			// A failed check (an API hiccup) is a state to report, not the
			// end of the wait; the deadline ends it.
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			ready, state, err := it.check(cctx)
			cancel()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				ready, state = false, "error: "+oneLine(err.Error())
			}
			elapsed := time.Since(start).Round(time.Second)
			if ready {
				ps[i].done = true
				fmt.Fprintf(w.Out, "✔ %s ready (%s)\n", it.object, elapsed)
				continue
			}
			pending++
			if state != ps[i].state || time.Since(ps[i].printed) >= heartbeat {
				fmt.Fprintf(w.Out, "  waiting for %s: %s; want %s (%s)\n", it.object, state, it.want, elapsed)
				ps[i].state, ps[i].printed = state, time.Now()
			}
		}
		if pending == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			var not []string
			first := -1
			for i, it := range items {
				if !ps[i].done {
					not = append(not, it.object)
					if first < 0 {
						first = i
					}
				}
			}
			more := ""
			if len(not) > 1 {
				more = fmt.Sprintf(" (and %d more: %s)", len(not)-1, strings.Join(not[1:], ", "))
			}
			return fmt.Errorf("%s not ready after %s: %s; want %s%s (raise --timeout, or look at it with kubectl describe)",
				items[first].object, w.Timeout, ps[first].state, items[first].want, more)
		case <-t.C:
		}
	}
}

// conditionState describes condition typ of conds: "Available=False
// (Reason: message)" or "Available not reported".
func conditionState(typ string, status, reason, message string, found bool) string {
	if !found {
		return typ + " not reported"
	}
	s := typ + "=" + status
	switch {
	case reason != "" && message != "":
		s += " (" + reason + ": " + message + ")"
	case reason != "":
		s += " (" + reason + ")"
	case message != "":
		s += " (" + message + ")"
	}
	return s
}

// readinessOf returns what to wait for on obj, or false when its kind is
// ready once applied.
func (c *cluster) readinessOf(obj *unstructured.Unstructured) (readiness, bool) {
	ns, name := obj.GetNamespace(), obj.GetName()
	switch obj.GroupVersionKind().GroupKind() {
	case schema.GroupKind{Group: "apps", Kind: "Deployment"}:
		return readiness{
			object: ref(obj),
			want:   "Available=True with all replicas updated and available",
			check: func(ctx context.Context) (bool, string, error) {
				d, err := c.kube.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					return false, "", c.explain("get "+ref(obj), err)
				}
				ready, state := deploymentReady(d)
				return ready, state, nil
			},
		}, true
	case schema.GroupKind{Group: "apps", Kind: "DaemonSet"}:
		return readiness{
			object: ref(obj),
			want:   "every scheduled pod updated and available",
			check: func(ctx context.Context) (bool, string, error) {
				d, err := c.kube.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					return false, "", c.explain("get "+ref(obj), err)
				}
				ready, state := daemonSetReady(d)
				return ready, state, nil
			},
		}, true
	case schema.GroupKind{Group: "apiextensions.k8s.io", Kind: "CustomResourceDefinition"}:
		return c.conditionReadiness(obj, "Established"), true
	}
	return readiness{}, false
}

// conditionReadiness waits for status.conditions[type=typ] to be True.
func (c *cluster) conditionReadiness(obj *unstructured.Unstructured, typ string) readiness {
	return readiness{
		object: ref(obj),
		want:   typ + "=True",
		check: func(ctx context.Context) (bool, string, error) {
			ri, _, err := c.resource(obj.GroupVersionKind(), obj.GetNamespace())
			if err != nil {
				return false, "", c.explain("get "+ref(obj), err)
			}
			u, err := ri.Get(ctx, obj.GetName(), metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return false, "not found", nil
			}
			if err != nil {
				return false, "", c.explain("get "+ref(obj), err)
			}
			status, reason, message, found := findCondition(u, typ)
			return found && status == "True", conditionState(typ, status, reason, message, found), nil
		},
	}
}

// findCondition reads status.conditions[type=typ] of an unstructured object.
func findCondition(u *unstructured.Unstructured, typ string) (status, reason, message string, found bool) {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if !ok || m["type"] != typ {
			continue
		}
		s, _ := m["status"].(string)
		r, _ := m["reason"].(string)
		msg, _ := m["message"].(string)
		return s, r, msg, true
	}
	return "", "", "", false
}

func deploymentReady(d *appsv1.Deployment) (bool, string) {
	want := int32(1)
	if d.Spec.Replicas != nil {
		want = *d.Spec.Replicas
	}
	var cond *appsv1.DeploymentCondition
	for i := range d.Status.Conditions {
		if d.Status.Conditions[i].Type == appsv1.DeploymentAvailable {
			cond = &d.Status.Conditions[i]
		}
	}
	state := conditionState("Available", "", "", "", false)
	if cond != nil {
		state = conditionState("Available", string(cond.Status), cond.Reason, cond.Message, true)
	}
	state += fmt.Sprintf(", %d/%d replicas available", d.Status.AvailableReplicas, want)
	if d.Status.ObservedGeneration < d.Generation {
		return false, state + " (generation not yet observed by the deployment controller)"
	}
	ready := cond != nil && cond.Status == "True" &&
		d.Status.UpdatedReplicas == want && d.Status.AvailableReplicas == want && d.Status.Replicas == want
	return ready, state
}

func daemonSetReady(d *appsv1.DaemonSet) (bool, string) {
	s := d.Status
	state := fmt.Sprintf("%d/%d pods available, %d updated", s.NumberAvailable, s.DesiredNumberScheduled, s.UpdatedNumberScheduled)
	if s.ObservedGeneration < d.Generation {
		return false, state + " (generation not yet observed by the daemonset controller)"
	}
	return s.NumberAvailable == s.DesiredNumberScheduled && s.UpdatedNumberScheduled == s.DesiredNumberScheduled, state
}

// fromUnstructured converts u into a typed object.
func fromUnstructured(u *unstructured.Unstructured, into any) error {
	return runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, into)
}
