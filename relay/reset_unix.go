//go:build linux || darwin

package relay

import "syscall"

// waitReset blocks until the half-closed TCP socket under rc fails (the
// peer reset it: the error, EPIPE or ECONNRESET) or is closed (nil).
// Reading it would return EOF at once, forever, even after a reset;
// instead it waits for the poller's next event on it and checks SO_ERROR.
func waitReset(rc syscall.RawConn) error {
	var reset error
	err := rc.Read(func(fd uintptr) bool {
		v, err := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ERROR)
		switch {
		case err != nil:
			reset = err
		case v != 0:
			reset = syscall.Errno(v)
		default:
			return false // still only its EOF: wait for the next event
		}
		return true
	})
	if err != nil {
		return nil // closed (by Join)
	}
	return reset
}
