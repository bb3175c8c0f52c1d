package kubelet

import (
	"fmt"
	"io"
	"os"
	"os/exec"

	"golang.org/x/sys/unix"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// runTTY runs cmd on a new pseudo-terminal (its controlling terminal:
// cmd.SysProcAttr has Setsid and Setctty), copying in to it and its output
// to out, and applying resize events, until cmd exits.
func runTTY(cmd *exec.Cmd, in io.Reader, out io.Writer, resize <-chan remotecommand.TerminalSize) error {
	ptmx, tty, err := openPTY()
	if err != nil {
		return err
	}
	defer ptmx.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	cmd.SysProcAttr.Ctty = 0 // fd 0 of the child: the terminal
	err = cmd.Start()
	tty.Close()
	if err != nil {
		return err
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case <-done:
				return
			case sz, ok := <-resize:
				if !ok {
					return
				}
				unix.IoctlSetWinsize(int(ptmx.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: sz.Height, Col: sz.Width})
			}
		}
	}()
	if in != nil {
		go io.Copy(ptmx, in)
	}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		if out != nil {
			io.Copy(out, ptmx) // ends with EIO once the last holder of the terminal exits
		} else {
			io.Copy(io.Discard, ptmx)
		}
	}()
	err = cmd.Wait()
	<-copied
	return exitError(err)
}

// openPTY opens a pseudo-terminal pair.
func openPTY() (ptmx, tty *os.File, err error) {
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	ptmx = os.NewFile(uintptr(fd), "/dev/ptmx")
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		ptmx.Close()
		return nil, nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		ptmx.Close()
		return nil, nil, fmt.Errorf("pty number: %w", err)
	}
	tty, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		ptmx.Close()
		return nil, nil, err
	}
	return ptmx, tty, nil
}
