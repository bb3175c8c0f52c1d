package kubelet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// proc is a container run from Kubelet.Images: a process in the pod's
// network namespace, restarted when it exits (restartPolicy Always) until
// stop.
type proc struct {
	name string // <namespace>.<pod>.<container>
	log  string // its combined stdout/stderr

	mu      sync.Mutex // guards cmd, stopped
	cmd     *exec.Cmd  // the current run; nil between runs
	stopped bool

	stopCh chan struct{}  // closed by stop
	done   chan struct{}  // closed when the supervisor returns
	runs   sync.WaitGroup // the current run's waiter
}

// containerSpec is a container resolved for this machine: binary, argv,
// environment, and readiness probe.
type containerSpec struct {
	bin      string
	args     []string
	env      []string
	probeURL string   // the readiness probe's (HTTP GET), "" without one
	probeTCP string   // the readiness probe's (TCP connect) address, "" without one
	uts      string   // the pod's UTS namespace, "" for none
	mnt      string   // the pod's mount namespace, "" for none
	setpriv  []string // setpriv's arguments (SecurityContext), nil for none
}

// resolve turns container c of pod into a process spec: its image mapped to a
// binary, env resolved (values with $(VAR) expansion, fieldRefs), volumes
// materialized under dir, and every argument or env value that starts with a
// volume's mountPath pointed at that volume's directory instead (there are no
// mount namespaces here). The image's entrypoint (command[0]) is the binary;
// command[1:] and args follow, $(VAR) expanded.
//
// With inImage (MountVolumes: the pod has a mount namespace in which the
// volumes are at their mountPaths and the image's directory at inImage), no
// volume path is rewritten and the image's files are named under inImage.
func (k *Kubelet) resolve(ctx context.Context, pod *corev1.Pod, pn podNet, c corev1.Container, dir, inImage string) (*containerSpec, error) {
	bin := k.Images[c.Image]
	root := "" // the image's files, when it maps to a directory
	if st, err := os.Stat(bin); err == nil && st.IsDir() {
		// An image of several programs (ambit's, with /istiod-lite,
		// /ztunnel and /waypoint): command[0] names one, else the
		// image's entrypoint.
		root = bin
		switch {
		case len(c.Command) > 0:
			bin = filepath.Join(root, filepath.Base(c.Command[0]))
		case k.Entrypoints[c.Image] != "":
			bin = filepath.Join(root, k.Entrypoints[c.Image])
		default:
			return nil, fmt.Errorf("image %s maps to the directory %s: the container needs a command (or Kubelet.Entrypoints)", c.Image, root)
		}
	}
	vols, err := k.volumes(ctx, pod, c, dir)
	if err != nil {
		return nil, err
	}
	// In the pod's mount namespace the image's directory is inImage.
	imageRoot, inRoot := root, root
	if inImage != "" {
		vols = nil // mounted where the manifest says
		if root == "" {
			imageRoot = filepath.Dir(bin)
		}
		inRoot = inImage
		bin = filepath.Join(inImage, strings.TrimPrefix(bin, imageRoot))
	}
	// Longest mount path first, in one pass (a volume's directory may
	// itself start with another mount's path, /tmp).
	mounts := slices.Collect(func(yield func(string) bool) {
		for m := range vols {
			if !yield(m) {
				return
			}
		}
	})
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	repath := func(s string) string {
		for _, m := range mounts {
			if s == m || strings.HasPrefix(s, m+"/") {
				return vols[m] + s[len(m):]
			}
			if i := strings.Index(s, "="+m); i >= 0 && (len(s) == i+1+len(m) || s[i+1+len(m)] == '/') {
				return s[:i+1] + vols[m] + s[i+1+len(m):] // --flag=/path
			}
		}
		// A file of the image's own (/cert.crt, --key=/cert.key).
		if root != "" {
			flag, path, ok := strings.Cut(s, "=")
			if !ok {
				flag, path = "", s
			}
			if strings.HasPrefix(path, "/") && path != "/" {
				if _, err := os.Stat(filepath.Join(root, path)); err == nil {
					if ok {
						return flag + "=" + filepath.Join(inRoot, path)
					}
					return filepath.Join(inRoot, path)
				}
			}
		}
		return s
	}
	vars := map[string]string{}
	var env []string
	// As a kubelet: the API server's Service (default/kubernetes) first,
	// the container's own variables after it.
	if k.ServiceProxy {
		if host, port, ok := k.apiService(ctx); ok {
			for _, kv := range [][2]string{{"KUBERNETES_SERVICE_HOST", host}, {"KUBERNETES_SERVICE_PORT", port},
				{"KUBERNETES_SERVICE_PORT_HTTPS", port}, {"KUBERNETES_PORT", "tcp://" + net.JoinHostPort(host, port)}} {
				vars[kv[0]] = kv[1]
				env = append(env, kv[0]+"="+kv[1])
			}
		}
	}
	for _, e := range c.Env {
		// Paths are rewritten before expansion: an expanded $(VAR) is
		// already rewritten.
		v := expand(repath(e.Value), vars)
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil {
				return nil, fmt.Errorf("env %s: only fieldRef is supported", e.Name)
			}
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				v = pod.Name
			case "metadata.namespace":
				v = pod.Namespace
			case "spec.nodeName":
				v = pod.Spec.NodeName
			case "spec.serviceAccountName":
				v = pod.Spec.ServiceAccountName
			case "metadata.uid":
				v = string(pod.UID)
			case "status.podIP":
				v = pn.ip.String()
			case "status.hostIP":
				v = k.Node.IP.String()
			default:
				return nil, fmt.Errorf("env %s: fieldRef %s is not supported", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		}
		vars[e.Name] = v
		env = append(env, e.Name+"="+v)
	}
	// The image's directory first: its other programs (an echo image's
	// client) are what exec'd commands name.
	home := dir
	if inImage != "" {
		home = "/" // dir may be hidden by a volume (/tmp)
	}
	env = append(env, "PATH="+filepath.Dir(bin)+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME="+home, "HOSTNAME="+pod.Name)
	var args []string
	if len(c.Command) > 1 {
		args = append(args, c.Command[1:]...)
	}
	args = append(args, c.Args...)
	for i, a := range args {
		args[i] = expand(repath(a), vars)
	}
	spec := &containerSpec{bin: bin, args: args, env: env}
	probePort := func(p intstr.IntOrString) (string, error) {
		port := p.IntValue()
		if p.Type == intstr.String {
			for _, cp := range c.Ports {
				if cp.Name == p.StrVal {
					port = int(cp.ContainerPort)
				}
			}
		}
		if port == 0 {
			return "", fmt.Errorf("readiness probe port %s: no such container port", p.String())
		}
		return net.JoinHostPort(pn.ip.String(), strconv.Itoa(port)), nil
	}
	if rp := c.ReadinessProbe; rp != nil {
		switch {
		case rp.HTTPGet != nil:
			addr, err := probePort(rp.HTTPGet.Port)
			if err != nil {
				return nil, err
			}
			spec.probeURL = "http://" + addr + rp.HTTPGet.Path
		case rp.TCPSocket != nil:
			addr, err := probePort(rp.TCPSocket.Port)
			if err != nil {
				return nil, err
			}
			spec.probeTCP = addr
		}
	}
	return spec, nil
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expand replaces $(VAR) with vars' values, as the kubelet does (an
// unknown reference stays as written).
func expand(s string, vars map[string]string) string {
	return varRef.ReplaceAllStringFunc(s, func(m string) string {
		if v, ok := vars[m[2:len(m)-1]]; ok {
			return v
		}
		return m
	})
}

// volumes materializes the volumes container c mounts under dir and returns
// mountPath -> directory.
func (k *Kubelet) volumes(ctx context.Context, pod *corev1.Pod, c corev1.Container, dir string) (map[string]string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, m := range c.VolumeMounts {
		i := slices.IndexFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name })
		if i < 0 {
			return nil, fmt.Errorf("volume mount %s: no such volume", m.Name)
		}
		v := pod.Spec.Volumes[i]
		vd := filepath.Join(dir, "volumes", v.Name)
		if err := os.MkdirAll(vd, 0o700); err != nil {
			return nil, err
		}
		switch {
		case v.EmptyDir != nil:
		case v.HostPath != nil:
			// This node's view of the machine's path (HostPaths), the
			// directory itself: not a copy.
			hp := k.hostPath(v.HostPath.Path)
			t := corev1.HostPathUnset
			if v.HostPath.Type != nil {
				t = *v.HostPath.Type
			}
			if t == corev1.HostPathDirectoryOrCreate || hp != v.HostPath.Path {
				if err := os.MkdirAll(hp, 0o755); err != nil {
					return nil, fmt.Errorf("volume %s: %w", v.Name, err)
				}
			}
			if _, err := os.Stat(hp); err != nil && t != corev1.HostPathUnset {
				return nil, fmt.Errorf("volume %s: hostPath: %w", v.Name, err)
			}
			os.Remove(vd) // made above, unused
			vd = hp
		case v.Secret != nil:
			if err := k.writeSecret(ctx, pod.Namespace, v.Secret.SecretName, v.Secret.Items, vd); err != nil {
				return nil, fmt.Errorf("volume %s: %w", v.Name, err)
			}
		case v.ConfigMap != nil:
			if err := k.writeConfigMap(ctx, pod.Namespace, v.ConfigMap.Name, v.ConfigMap.Items, vd); err != nil {
				return nil, fmt.Errorf("volume %s: %w", v.Name, err)
			}
		case v.Projected != nil:
			for _, src := range v.Projected.Sources {
				switch {
				case src.ServiceAccountToken != nil:
					mint := k.Token
					if mint == nil {
						mint = k.requestToken
					}
					tok, err := mint(ctx, pod, src.ServiceAccountToken.Audience)
					if err != nil {
						return nil, fmt.Errorf("volume %s: %w", v.Name, err)
					}
					if err := os.WriteFile(filepath.Join(vd, src.ServiceAccountToken.Path), []byte(tok), 0o600); err != nil {
						return nil, err
					}
				case src.ConfigMap != nil:
					if err := k.writeConfigMap(ctx, pod.Namespace, src.ConfigMap.Name, src.ConfigMap.Items, vd); err != nil {
						return nil, fmt.Errorf("volume %s: %w", v.Name, err)
					}
				case src.Secret != nil:
					if err := k.writeSecret(ctx, pod.Namespace, src.Secret.Name, src.Secret.Items, vd); err != nil {
						return nil, fmt.Errorf("volume %s: %w", v.Name, err)
					}
				case src.DownwardAPI != nil:
					// The service-account admission's kube-api-access
					// volume projects the namespace.
					for _, it := range src.DownwardAPI.Items {
						if it.FieldRef == nil {
							return nil, fmt.Errorf("volume %s: only fieldRef downward API items are supported", v.Name)
						}
						val, ok := map[string]string{"metadata.name": pod.Name, "metadata.namespace": pod.Namespace,
							"metadata.uid": string(pod.UID), "spec.nodeName": pod.Spec.NodeName,
							"spec.serviceAccountName": pod.Spec.ServiceAccountName}[it.FieldRef.FieldPath]
						if !ok {
							return nil, fmt.Errorf("volume %s: fieldRef %s is not supported", v.Name, it.FieldRef.FieldPath)
						}
						if err := os.WriteFile(filepath.Join(vd, it.Path), []byte(val), 0o600); err != nil {
							return nil, err
						}
					}
				default:
					return nil, fmt.Errorf("volume %s: only serviceAccountToken, configMap, secret and downwardAPI projections are supported", v.Name)
				}
			}
		default:
			return nil, fmt.Errorf("volume %s: only emptyDir, hostPath, configMap, secret and projected volumes are supported", v.Name)
		}
		out[m.MountPath] = vd
	}
	return out, nil
}

// requestToken mints pod's service-account token for audience (none: the
// API server's) with the TokenRequest API, bound to the pod, as a kubelet
// does for a projected serviceAccountToken volume.
func (k *Kubelet) requestToken(ctx context.Context, pod *corev1.Pod, audience string) (string, error) {
	var auds []string
	if audience != "" {
		auds = []string{audience}
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         auds,
		ExpirationSeconds: new(int64(3600)),
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	resp, err := k.Client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for %s/%s: %w", pod.Namespace, sa, err)
	}
	return resp.Status.Token, nil
}

func (k *Kubelet) writeSecret(ctx context.Context, ns, name string, items []corev1.KeyToPath, dir string) error {
	sec, err := k.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("secret %s/%s: %w", ns, name, err)
	}
	if len(items) == 0 {
		for key := range sec.Data {
			items = append(items, corev1.KeyToPath{Key: key, Path: key})
		}
	}
	for _, it := range items {
		v, ok := sec.Data[it.Key]
		if !ok {
			return fmt.Errorf("secret %s/%s has no key %s", ns, name, it.Key)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, it.Path)), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, it.Path), v, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// hostPath is this node's view of the machine's path (Kubelet.HostPaths).
func (k *Kubelet) hostPath(path string) string {
	best := ""
	for from := range k.HostPaths {
		if (path == from || strings.HasPrefix(path, from+"/")) && len(from) > len(best) {
			best = from
		}
	}
	if best == "" {
		return path
	}
	return k.HostPaths[best] + path[len(best):]
}

func (k *Kubelet) writeConfigMap(ctx context.Context, ns, name string, items []corev1.KeyToPath, dir string) error {
	cm, err := k.Client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("configmap %s/%s: %w", ns, name, err)
	}
	if len(items) == 0 {
		for key := range cm.Data {
			items = append(items, corev1.KeyToPath{Key: key, Path: key})
		}
	}
	for _, it := range items {
		v, ok := cm.Data[it.Key]
		if !ok {
			return fmt.Errorf("configmap %s/%s has no key %s", ns, name, it.Key)
		}
		if err := os.WriteFile(filepath.Join(dir, it.Path), []byte(v), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// startProc supervises spec in p's namespace: it runs it, waits for its
// readiness probe (if any) and publishes Ready, publishes not Ready when it
// exits, and starts it again after RestartDelay, until stop.
func (k *Kubelet) startProc(pod *corev1.Pod, p podNet, name string, spec *containerSpec, dir string, log *slog.Logger) *proc {
	pr := &proc{name: name, log: filepath.Join(dir, name+".log"), stopCh: make(chan struct{}), done: make(chan struct{})}
	delay := k.RestartDelay
	if delay <= 0 {
		delay = time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-pr.stopCh
		cancel()
	}()
	go func() {
		defer close(pr.done)
		for restarts := 0; ; restarts++ {
			exited, err := pr.run(p.ns, spec)
			if err != nil {
				log.Error("container start", "container", name, "err", err)
			} else {
				log.Info("container started", "container", name, "restarts", restarts)
				if k.waitProbe(ctx, spec, exited) {
					if err := k.setStatus(ctx, pod, p.ip.String(), true); err != nil {
						log.Error("pod status", "container", name, "err", err)
					}
				}
				select {
				case <-exited:
				case <-pr.stopCh:
					return
				}
				log.Info("container exited", "container", name)
			}
			if ctx.Err() != nil {
				return
			}
			if err := k.setStatus(ctx, pod, p.ip.String(), false); err != nil && ctx.Err() == nil {
				log.Error("pod status", "container", name, "err", err)
			}
			select {
			case <-pr.stopCh:
				return
			case <-time.After(delay):
			}
		}
	}()
	return pr
}

// run starts one run of the process; exited closes when it ends.
func (pr *proc) run(netNS *netns.NS, spec *containerSpec) (<-chan struct{}, error) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.stopped {
		return nil, errors.New("stopped")
	}
	f, err := os.OpenFile(pr.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	ns := []string{"--net=" + netNS.Path()}
	if spec.uts != "" {
		ns = append(ns, "--uts="+spec.uts)
	}
	if spec.mnt != "" {
		ns = append(ns, "--mount="+spec.mnt)
	}
	argv := append(ns, "--")
	if spec.setpriv != nil {
		argv = append(append(append(argv, "setpriv"), spec.setpriv...), "--")
	}
	cmd := exec.Command("nsenter", append(append(argv, spec.bin), spec.args...)...)
	cmd.Env = spec.env
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	pr.cmd = cmd
	exited := make(chan struct{})
	pr.runs.Add(1)
	go func() {
		defer pr.runs.Done()
		cmd.Wait()
		f.Close()
		pr.mu.Lock()
		pr.cmd = nil
		pr.mu.Unlock()
		close(exited)
	}()
	return exited, nil
}

// kill ends the current run with SIGKILL (a crash: the supervisor starts it
// again). It reports whether a run was killed.
func (pr *proc) kill() bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.cmd == nil {
		return false
	}
	syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGKILL)
	return true
}

// stop ends the process for good (SIGTERM, then SIGKILL after grace) and
// waits for it.
func (pr *proc) stop(grace time.Duration) {
	pr.mu.Lock()
	if pr.stopped {
		pr.mu.Unlock()
		<-pr.done
		return
	}
	pr.stopped = true
	close(pr.stopCh)
	cmd := pr.cmd
	pr.mu.Unlock()
	if cmd != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		t := time.AfterFunc(grace, func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
		pr.runs.Wait()
		t.Stop()
	}
	<-pr.done
}

// waitProbe polls the readiness probe (from the node, as a kubelet does:
// an HTTP GET or a TCP connect) until it passes (true), the run exits or ctx
// ends (false). No probe: ready at once.
func (k *Kubelet) waitProbe(ctx context.Context, spec *containerSpec, exited <-chan struct{}) bool {
	url := spec.probeURL
	if url == "" && spec.probeTCP == "" {
		return true
	}
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return k.Node.NS.Dial(ctx, nil, network, addr)
		},
		DisableKeepAlives: true,
	}}
	for {
		if url != "" {
			if resp, err := client.Get(url); err == nil {
				resp.Body.Close()
				if resp.StatusCode >= 200 && resp.StatusCode < 400 {
					return true
				}
			}
		} else {
			dctx, cancel := context.WithTimeout(ctx, time.Second)
			c, err := k.Node.NS.Dial(dctx, nil, "tcp", spec.probeTCP)
			cancel()
			if err == nil {
				c.Close()
				return true
			}
		}
		select {
		case <-exited:
			return false
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}
