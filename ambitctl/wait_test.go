package ambitctl

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestWaiter(t *testing.T) {
	var polls atomic.Int32
	items := []readiness{
		{object: "Deployment a/ready-third", want: "Available=True", check: func(context.Context) (bool, string, error) {
			n := polls.Add(1)
			return n >= 3, "Available=False (MinimumReplicasUnavailable)", nil
		}},
		{object: "DaemonSet a/flaky", want: "every pod available", check: func(context.Context) (bool, string, error) {
			return false, "", errors.New("connection reset")
		}},
		{object: "Deployment a/never", want: "Available=True", check: func(context.Context) (bool, string, error) {
			return false, "Available not reported", nil
		}},
	}
	var out bytes.Buffer
	err := waiter{Out: &out, Timeout: 200 * time.Millisecond, Interval: 10 * time.Millisecond}.wait(t.Context(), items)
	if err == nil {
		t.Fatal("wait returned nil with objects never ready")
	}
	want := "DaemonSet a/flaky not ready after 200ms: error: connection reset; want every pod available (and 1 more: Deployment a/never)"
	if !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error = %q, want prefix %q", err, want)
	}
	for _, line := range []string{
		"  waiting for Deployment a/ready-third: Available=False (MinimumReplicasUnavailable); want Available=True (0s)\n",
		"✔ Deployment a/ready-third ready (0s)\n",
		"  waiting for DaemonSet a/flaky: error: connection reset; want every pod available (0s)\n",
		"  waiting for Deployment a/never: Available not reported; want Available=True (0s)\n",
	} {
		if !strings.Contains(out.String(), line) {
			t.Errorf("progress lacks %q:\n%s", line, out.String())
		}
	}
	// An unchanged state is printed once per heartbeat (5s), not per poll.
	if n := strings.Count(out.String(), "waiting for Deployment a/never"); n != 1 {
		t.Errorf("%d progress lines for an unchanged state, want 1:\n%s", n, out.String())
	}

	// All ready: nil, and cancellation ends a wait early.
	if err := (waiter{Out: &out, Timeout: time.Second}).wait(t.Context(), items[:1]); err != nil {
		t.Errorf("wait on a ready object: %v", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := (waiter{Out: &out, Timeout: time.Minute}).wait(ctx, items[2:]); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled wait: %v", err)
	}
}
