package analyzer_test

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/ambit-mesh/ambit/ambitctl/analyzer"
)

// Each file under testdata plants one error (clean.yaml none); analysis must
// find exactly it.
func TestAnalyzeFiles(t *testing.T) {
	for _, tc := range []struct {
		file string
		want []string // "code severity object"; severity decides the exit status
	}{
		{"missing-waypoint.yaml", []string{"AMB0001 Error Namespace shop"}},
		{"missing-waypoint-service.yaml", []string{"AMB0001 Error Service shop/cart"}},
		{"waypoint-http-listener.yaml", []string{"AMB0002 Error Gateway shop/waypoint"}},
		{"waypoint-wrong-port.yaml", []string{"AMB0002 Error Gateway shop/waypoint"}},
		{"route-missing-parent.yaml", []string{"AMB0003 Error HTTPRoute shop/reviews"}},
		{"route-missing-backend.yaml", []string{"AMB0004 Error HTTPRoute shop/reviews"}},
		{"route-zero-weights.yaml", []string{"AMB0005 Error HTTPRoute shop/reviews"}},
		{"authz-selects-nothing.yaml", []string{"AMB0006 Warning AuthorizationPolicy shop/ratings-allow"}},
		{"strict-not-enrolled.yaml", []string{"AMB0007 Warning PeerAuthentication legacy/default"}},
		{"waypoint-not-programmed.yaml", []string{"AMB0008 Warning Namespace shop"}},
		{"not-a-waypoint.yaml", []string{"AMB0009 Error Namespace shop"}},
		{"clean.yaml", nil},
	} {
		t.Run(tc.file, func(t *testing.T) {
			in, err := analyzer.ReadFiles(filepath.Join("testdata", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, f := range analyzer.Analyze(in) {
				got = append(got, f.Code+" "+string(f.Severity)+" "+f.Object)
				if f.Message == "" || f.Fix == "" {
					t.Errorf("incomplete finding %+v", f)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("findings = %q, want %q", got, tc.want)
			}
		})
	}
}

// The repository's examples are clean.
func TestAnalyzeExamples(t *testing.T) {
	in, err := analyzer.ReadFiles("../../examples")
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Namespaces) == 0 || len(in.AuthorizationPolicies) == 0 {
		t.Fatalf("examples read nothing: %+v", in)
	}
	if fs := analyzer.Analyze(in); len(fs) != 0 {
		t.Errorf("findings in examples/: %v", fs)
	}
}
