package kubelet

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

func TestDNSAnswers(t *testing.T) {
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, s := range []*corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "web"}, Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.42"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "headless", Namespace: "web"}, Spec: corev1.ServiceSpec{ClusterIP: "None"}},
	} {
		if err := idx.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	lister := listersv1.NewServiceLister(idx)
	for _, tc := range []struct {
		name  string
		qtype dnsmessage.Type
		rcode dnsmessage.RCode
		addr  string // the A record, "" for none
	}{
		{"echo.web.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, "10.96.0.42"},
		{"ECHO.Web.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, "10.96.0.42"},
		{"echo.web.svc.cluster.local.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, ""},
		{"headless.web.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, ""},
		{"echo.other.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, ""},
		{"echo.web.svc.cluster.local.web.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, ""},
		{"example.com.", dnsmessage.TypeA, dnsmessage.RCodeRefused, ""},
	} {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, RecursionDesired: true})
		b.StartQuestions()
		b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(tc.name), Type: tc.qtype, Class: dnsmessage.ClassINET})
		q, err := b.Finish()
		if err != nil {
			t.Fatal(err)
		}
		resp, err := answer(q, lister)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if m.ID != 7 || !m.Response || m.RCode != tc.rcode || len(m.Questions) != 1 {
			t.Errorf("%s %v: header %+v, want rcode %v", tc.name, tc.qtype, m.Header, tc.rcode)
			continue
		}
		var got string
		for _, a := range m.Answers {
			if r, ok := a.Body.(*dnsmessage.AResource); ok {
				got = netip.AddrFrom4(r.A).String()
			}
		}
		if got != tc.addr || len(m.Answers) > 1 {
			t.Errorf("%s %v: answers %v, want %q", tc.name, tc.qtype, m.Answers, tc.addr)
		}
	}
}
