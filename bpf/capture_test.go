package bpf

import (
	"bytes"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
)

func TestCaptureSmoke(t *testing.T) {
	e := newEnv(t, "a1", "b1")
	got, err := e.talk("a1", "b1", "hello")
	if err != nil {
		t.Fatal(err)
	}
	t.Log(got)
	t.Log(e.zt["n1"].records(), e.zt["n2"].records())
	s, _ := e.cap["n1"].Stats()
	t.Logf("n1 %+v", s)
	s, _ = e.cap["n2"].Stats()
	t.Logf("n2 %+v", s)
}

var (
	_ = bytes.Contains
	_ = errors.Is
	_ = netip.Addr{}
	_ = filepath.Join
	_ = strings.Contains
	_ = syscall.ECONNREFUSED
	_ = time.Now
	_ = netns.Uplink
)
