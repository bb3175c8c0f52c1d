package kubelet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	listersv1 "k8s.io/client-go/listers/core/v1"
)

// ClusterDomain is the cluster's DNS domain.
const ClusterDomain = "cluster.local"

// mntDir holds the pods' mount namespaces (bind mounts; itself a private
// mount, as the pin of a mount namespace must not be seen from inside it).
const mntDir = "/run/ambit-mnt"

// serveDNS answers A queries for Services (<service>.<namespace>.svc.
// cluster.local: the ClusterIP) on the node's address, port 53, in the
// node's namespace, until ctx ends. Other names in the cluster domain do
// not exist; names outside it are refused (nodes have no upstream).
func (k *Kubelet) serveDNS(ctx context.Context, services listersv1.ServiceLister, log *slog.Logger) error {
	var pc net.PacketConn
	err := k.Node.NS.Do(func() (err error) {
		pc, err = net.ListenPacket("udp", net.JoinHostPort(k.Node.IP.String(), "53"))
		return err
	})
	if err != nil {
		return fmt.Errorf("kubelet: dns: %w", err)
	}
	go func() {
		<-ctx.Done()
		pc.Close()
	}()
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("kubelet: dns: %w", err)
		}
		resp, err := answer(buf[:n], services)
		if err != nil {
			log.Debug("dns: bad query", "from", from.String(), "err", err)
			continue
		}
		pc.WriteTo(resp, from)
	}
}

// answer builds the response to one query.
func answer(query []byte, services listersv1.ServiceLister) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	name := strings.ToLower(strings.TrimSuffix(q.Name.String(), "."))
	var addr netip.Addr
	switch {
	case name != ClusterDomain && !strings.HasSuffix(name, "."+ClusterDomain):
		rh.Authoritative = false
		rh.RCode = dnsmessage.RCodeRefused
	default:
		rh.RCode = dnsmessage.RCodeNameError
		// <service>.<namespace>.svc.cluster.local
		if labels := strings.Split(strings.TrimSuffix(name, "."+ClusterDomain), "."); len(labels) == 3 && labels[2] == "svc" {
			if svc, err := services.Services(labels[1]).Get(labels[0]); err == nil {
				rh.RCode = dnsmessage.RCodeSuccess // the name exists (an AAAA query gets no records)
				if a, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil && a.Is4() {
					addr = a
				}
			}
		}
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	if addr.IsValid() && (q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL) {
		if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: addr.As4()}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// startDNS starts the Service informer and the DNS server; it returns once
// the server listens and the informer synced.
func (k *Kubelet) startDNS(ctx context.Context, log *slog.Logger, done func()) error {
	factory := informers.NewSharedInformerFactory(k.Client, 0)
	services := factory.Core().V1().Services()
	services.Informer()
	factory.Start(ctx.Done())
	synced := factory.WaitForCacheSync(ctx.Done())
	for _, ok := range synced {
		if !ok {
			factory.Shutdown()
			return errors.New("kubelet: dns: services not synced")
		}
	}
	errc := make(chan error, 1)
	go func() {
		defer done()
		defer factory.Shutdown()
		errc <- k.serveDNS(ctx, services.Lister(), log)
	}()
	// serveDNS fails at once or not at all (binding).
	select {
	case err := <-errc:
		return err
	case <-time.After(100 * time.Millisecond):
		go func() {
			if err := <-errc; err != nil {
				log.Error("dns", "err", err)
			}
		}()
		return nil
	}
}

// newMountNS pins a mount namespace for pod at path with binds and, with
// ClusterDNS, /etc/resolv.conf naming the node's DNS (search
// <namespace>.svc, svc and the cluster domain, ndots 5, as a kubelet writes
// it) and, unless the pod is hostNetwork, /etc/hosts the pod's own name and
// address. Files live under dir. readOnlyRoot makes the root file system
// read-only in it.
func (k *Kubelet) newMountNS(path, dir string, pod *corev1.Pod, ip netip.Addr, binds []bindMount, readOnlyRoot bool) error {
	if k.ClusterDNS && (!pod.Spec.HostNetwork || pod.Spec.DNSPolicy == corev1.DNSClusterFirstWithHostNet) {
		resolv := filepath.Join(dir, "resolv.conf")
		search := fmt.Sprintf("%s.svc.%s svc.%s %s", pod.Namespace, ClusterDomain, ClusterDomain, ClusterDomain)
		if err := os.WriteFile(resolv, []byte("nameserver "+k.Node.IP.String()+"\nsearch "+search+"\noptions ndots:5\n"), 0o644); err != nil {
			return err
		}
		binds = append(binds, bindMount{src: resolv, dst: "/etc/resolv.conf"})
	}
	if k.ClusterDNS && !pod.Spec.HostNetwork {
		hosts := filepath.Join(dir, "hosts")
		if err := os.WriteFile(hosts, []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"+ip.String()+"\t"+pod.Name+"\n"), 0o644); err != nil {
			return err
		}
		binds = append(binds, bindMount{src: hosts, dst: "/etc/hosts"})
	}
	return newMountNamespace(path, binds, readOnlyRoot)
}

// removeMountNS unpins a namespace made by newMountNS.
func removeMountNS(path string) {
	_ = unix.Unmount(path, unix.MNT_DETACH)
	_ = os.Remove(path)
}

// privateDir makes dir a private mount of itself (once), so that mount
// namespaces can be pinned in it.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	mounted, err := isMountPoint(dir)
	if err != nil {
		return err
	}
	if !mounted {
		// (Two kubelets may race here: a second bind mount on top is as
		// good.)
		if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", dir, err)
	}
	return nil
}

// isMountPoint reports whether dir is a mount point (/proc/self/mountinfo).
func isMountPoint(dir string) (bool, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true, nil
		}
	}
	return false, nil
}
