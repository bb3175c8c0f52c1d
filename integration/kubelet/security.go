package kubelet

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// defaultCaps is a container runtime's (containerd's) default capability
// set, what a container has unless its securityContext says otherwise.
var defaultCaps = []string{"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
	"SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"}

// runAs is the user and group container c of pod runs as (the container's
// securityContext over the pod's; 0 when neither says).
func runAs(pod *corev1.Pod, c corev1.Container) (uid, gid int64) {
	if psc := pod.Spec.SecurityContext; psc != nil {
		if psc.RunAsUser != nil {
			uid = *psc.RunAsUser
		}
		if psc.RunAsGroup != nil {
			gid = *psc.RunAsGroup
		}
	}
	if sc := c.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			uid = *sc.RunAsUser
		}
		if sc.RunAsGroup != nil {
			gid = *sc.RunAsGroup
		}
	}
	return uid, gid
}

// setprivArgs are setpriv(1)'s arguments (up to "--") that give container c
// of pod its securityContext as a container runtime would: its user and
// group, the capability set (the runtime's default, or none after drop ALL,
// plus add, minus drop) as bounding set (and, for a user other than root,
// as inheritable and ambient set, so the program keeps them), and
// no_new_privs unless allowPrivilegeEscalation. A privileged container gets
// nil: everything.
func setprivArgs(pod *corev1.Pod, c corev1.Container) ([]string, error) {
	sc := c.SecurityContext
	if sc != nil && sc.Privileged != nil && *sc.Privileged {
		return nil, nil
	}
	caps := slices.Clone(defaultCaps)
	if sc != nil && sc.Capabilities != nil {
		for _, d := range sc.Capabilities.Drop {
			if strings.EqualFold(string(d), "ALL") {
				caps = nil
			}
			caps = slices.DeleteFunc(caps, func(c string) bool { return strings.EqualFold(c, strings.TrimPrefix(string(d), "CAP_")) })
		}
		for _, a := range sc.Capabilities.Add {
			caps = append(caps, strings.ToUpper(strings.TrimPrefix(string(a), "CAP_")))
		}
	}
	set := "-all"
	for _, c := range caps {
		set += ",+" + strings.ToLower(c)
	}
	uid, gid := runAs(pod, c)
	if sc != nil && sc.RunAsNonRoot != nil && *sc.RunAsNonRoot && uid == 0 {
		return nil, fmt.Errorf("container %s: runAsNonRoot and no non-root runAsUser", c.Name)
	}
	args := []string{"--reuid=" + strconv.FormatInt(uid, 10), "--regid=" + strconv.FormatInt(gid, 10), "--clear-groups", "--bounding-set=" + set}
	if uid != 0 {
		args = append(args, "--inh-caps="+set, "--ambient-caps="+set)
	}
	if sc != nil && sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		args = append(args, "--no-new-privs")
	}
	return args, nil
}

// readOnlyRoot reports whether every image-run container of pod asks for a
// read-only root file system (the pod's mount namespace is shared).
func (k *Kubelet) readOnlyRoot(pod *corev1.Pod) bool {
	n := 0
	for _, c := range pod.Spec.Containers {
		if _, ok := k.Images[c.Image]; !ok {
			continue
		}
		if c.SecurityContext == nil || c.SecurityContext.ReadOnlyRootFilesystem == nil || !*c.SecurityContext.ReadOnlyRootFilesystem {
			return false
		}
		n++
	}
	return n > 0
}

// chownVolumes gives the files of container c's volumes (but hostPaths, the
// machine's) to the user it runs as, as a kubelet makes a projected token
// readable by the container's runAsUser.
func chownVolumes(pod *corev1.Pod, c corev1.Container, vols map[string]string) error {
	uid, gid := runAs(pod, c)
	if uid == 0 {
		return nil
	}
	for _, m := range c.VolumeMounts {
		i := slices.IndexFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name })
		if i < 0 || pod.Spec.Volumes[i].HostPath != nil || vols[m.MountPath] == "" {
			continue
		}
		err := filepath.Walk(vols[m.MountPath], func(path string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Lchown(path, int(uid), int(gid))
		})
		if err != nil {
			return fmt.Errorf("volume %s: %w", m.Name, err)
		}
	}
	return nil
}
