package model

import "testing"

func TestEnrolled(t *testing.T) {
	ambient := map[string]string{LabelDataplaneMode: DataplaneAmbient}
	none := map[string]string{LabelDataplaneMode: DataplaneNone}
	other := map[string]string{"app": "web", LabelDataplaneMode: "sidecar"}
	for _, tc := range []struct {
		name     string
		ns, pod  map[string]string
		enrolled bool
	}{
		{"namespace enrolled", ambient, nil, true},
		{"namespace enrolled, pod other labels", ambient, map[string]string{"app": "web"}, true},
		{"pod opts out", ambient, none, false},
		{"namespace not labelled", nil, nil, false},
		{"namespace other mode", other, nil, false},
		{"namespace none", none, nil, false},
		{"pod ambient in plain namespace", nil, ambient, true},
		{"pod ambient in opted-out namespace", none, ambient, true},
		{"pod unknown mode in enrolled namespace", ambient, other, true},
		{"value is case-sensitive", map[string]string{LabelDataplaneMode: "Ambient"}, nil, false},
	} {
		if got := Enrolled(tc.ns, tc.pod); got != tc.enrolled {
			t.Errorf("%s: Enrolled = %v, want %v", tc.name, got, tc.enrolled)
		}
	}
}
