package bpf

// Labels that enroll pods in the mesh (Istio ambient's).
const (
	// DataplaneModeLabel on a namespace enrolls its pods with value
	// DataplaneModeAmbient; on a pod, value DataplaneModeNone opts it out.
	DataplaneModeLabel   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"
)

// Enrolled reports whether a pod is captured: its namespace is labelled
// istio.io/dataplane-mode=ambient and the pod does not opt out with
// istio.io/dataplane-mode=none. A pod labelled ambient in a namespace that is
// not enrolled is enrolled too, as in Istio.
func Enrolled(nsLabels, podLabels map[string]string) bool {
	switch podLabels[DataplaneModeLabel] {
	case DataplaneModeNone:
		return false
	case DataplaneModeAmbient:
		return true
	}
	return nsLabels[DataplaneModeLabel] == DataplaneModeAmbient
}
