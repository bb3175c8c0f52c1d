package bpf

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// Transparent sets IP_TRANSPARENT on a socket; use it as the Control of the
// net.ListenConfig of ztunnel's 15001, 15006 and 15008 listeners (their
// accepted sockets have the original destination, or the pod, as local
// address) and of the net.Dialer that delivers to a pod from the client's
// address (with LocalAddr set to it).
func Transparent(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
	}); err != nil {
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("set IP_TRANSPARENT: %w", serr)
	}
	return nil
}
