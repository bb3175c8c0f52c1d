package bpf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/integration/netns"
)

func TestCheckNamesWhatIsMissing(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir() // not a bpffs
	err := Check(dir, nil)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "bpffs at "+dir) {
		t.Errorf("Check(%s) = %v, want ErrUnsupported naming the missing bpffs", dir, err)
	}
	if strings.Count(err.Error(), "missing") != 1 {
		t.Errorf("Check error %q, want one message", err)
	}
	_, err = Load(Options{PinPath: dir})
	if !errors.Is(err, ErrUnsupported) {
		t.Errorf("Load with PinPath %s = %v, want ErrUnsupported", dir, err)
	}
	// This machine has what capture needs.
	if err := Check("/sys/fs/bpf", nil); err != nil {
		t.Errorf("Check on this machine: %v", err)
	}
}

func TestClosedCapture(t *testing.T) {
	requireRoot(t)
	ns, err := netns.New(fmt.Sprintf("bpft%d-closed", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Delete()
	opts := Options{PinPath: fmt.Sprintf("/sys/fs/bpf/ambit-test%d-closed", os.Getpid()), Netns: ns.Path()}
	c, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer Uninstall(opts)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := c.AddPod(context.Background(), Pod{Name: "x"}); !errors.Is(err, ErrClosed) {
		t.Errorf("AddPod after Close = %v, want ErrClosed", err)
	}
	if _, err := c.Stats(); !errors.Is(err, ErrClosed) {
		t.Errorf("Stats after Close = %v, want ErrClosed", err)
	}
}
