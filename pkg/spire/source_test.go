package spire

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshless/meshless/internal/logtest"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

var (
	buyer  = entry{namespace: "shop", serviceAccount: "buyer"}
	seller = entry{namespace: "shop", serviceAccount: "seller"}
)

func (e entry) workload(pod string) meshtls.Workload {
	return meshtls.Workload{ID: e.id(), Namespace: e.namespace, ServiceAccount: e.serviceAccount, PodName: pod, PodUID: "uid-" + pod}
}

func newSource(t *testing.T, env *spireEnv, logs *logtest.Buffer) *Source {
	t.Helper()
	src, err := New(Config{
		AdminSocket: env.adminSock,
		MaxBackoff:  time.Second,
		Log:         slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		src.Close()
		if t.Failed() {
			t.Logf("source log:\n%s", lastLines(logs.String(), 40))
		}
	})
	return src
}

// The source gets each pod's SVID with the SPIFFE ID its entry names, selected by k8s:ns and
// k8s:sa (the pod UID it passes too does not keep the entries from matching), and the trust
// bundle the server distributes; a pod without an entry fails clearly.
func TestSourceGetsSVIDsAndBundleFromSPIRE(t *testing.T) {
	env := startSPIRE(t, buyer, seller)
	logs := &logtest.Buffer{}
	src := newSource(t, env, logs)

	for _, en := range []entry{buyer, seller} {
		if err := src.Acquire(en.workload("p1")); err != nil {
			t.Fatalf("acquire %s: %v", en.id(), err)
		}
		svid, err := src.SVID(en.id())
		if err != nil {
			t.Fatal(err)
		}
		if svid.ID != en.id() {
			t.Errorf("SVID names %s, want %s", svid.ID, en.id())
		}
		// The chain verifies against the bundle the source holds.
		if id, _, err := x509svid.Verify(svid.Certificates, src); err != nil || id != en.id() {
			t.Errorf("SVID of %s does not verify against the source's bundle: %v (id %s)", en.id(), err, id)
		}
	}

	b, err := src.GetX509BundleForTrustDomain(testTD)
	if err != nil {
		t.Fatal(err)
	}
	want := env.bundleAuthorities()
	if len(want) == 0 || !b.HasX509Authority(want[0]) || len(b.X509Authorities()) != len(want) {
		t.Errorf("bundle has %d authorities, want the server's %d", len(b.X509Authorities()), len(want))
	}

	// A second pod of the same identity joins the subscription: same SVID, one stream.
	first, _ := src.SVID(buyer.id())
	if err := src.Acquire(buyer.workload("p2")); err != nil {
		t.Fatal(err)
	}
	if again, _ := src.SVID(buyer.id()); again != first {
		t.Error("a second pod of the same identity got another SVID")
	}
	src.Release(buyer.id())
	if _, err := src.SVID(buyer.id()); err != nil {
		t.Errorf("SVID dropped while a pod still uses it: %v", err)
	}
	src.Release(buyer.id())
	if _, err := src.SVID(buyer.id()); err == nil {
		t.Error("SVID still served after its last pod was released")
	}

	nobody := entry{namespace: "shop", serviceAccount: "nobody"}
	err = src.Acquire(nobody.workload("p3"))
	if err == nil || !strings.Contains(err.Error(), "no registration entry") || !strings.Contains(err.Error(), "k8s:sa:nobody") {
		t.Fatalf("acquire without an entry: %v, want an error naming the missing entry and the selectors", err)
	}
	if _, err := src.SVID(nobody.id()); err == nil {
		t.Error("a failed Acquire left the identity held")
	}

	rec := logs.Records("svid received")
	if len(rec) < 2 || rec[0]["spiffe_id"] == nil || rec[0]["serial"] == nil {
		t.Errorf("svid received log lines: %v", rec)
	}
}
