package agent

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshless/meshless/internal/podnet"
	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

// apiDirectory answers like the Kubernetes API: every pod runs as "web" and has the annotations
// stored for its name.
type apiDirectory map[string]map[string]string

func (d apiDirectory) Describe(_ context.Context, p enroll.Pod) (string, map[string]string, error) {
	a := d[p.Name]
	if a == nil {
		a = map[string]string{}
	}
	return "web", a, nil
}

// reports records what the agent reports, per pod name.
type reports struct {
	mu sync.Mutex
	m  map[string]string
}

func (r *reports) Report(p enroll.Pod, status string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m[p.Name] = status
}

func (r *reports) get(name string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m[name]
}

func withPolicy(f *fixture, dir Directory, excluded ...string) *reports {
	r := &reports{m: map[string]string{}}
	f.agent.cfg.Directory = dir
	f.agent.cfg.ExcludedNamespaces = excluded
	f.agent.cfg.Reporter = r
	return r
}

// Skipped pods need no data path: the test's own netns stands in for theirs. Since one netns is
// one pod, each enrollment replaces the one before.
func skippedPod(id, namespace, name string, annotations map[string]string) enroll.Pod {
	return enroll.Pod{
		ContainerID: id, IfName: "eth0", Netns: "/proc/self/ns/net", Namespace: namespace, Name: name, UID: "uid-" + id,
		IPs: []netip.Addr{netip.MustParseAddr("10.244.9.9")}, Annotations: annotations,
	}
}

func TestPolicySkipsExcludedAndAnnotatedPods(t *testing.T) {
	caDir, stateDir := t.TempDir(), t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	f := newAgent(t, tunnel.Strict, stateDir, caDir)
	dir := apiDirectory{"api-opt-out": {AnnotationInject: "false"}}
	r := withPolicy(f, dir, "kube-system", "monitoring")
	ctx := context.Background()

	cases := []struct {
		pod  enroll.Pod
		want string
	}{
		{skippedPod("c1", "kube-system", "coredns", nil), "namespace kube-system is excluded"},
		{skippedPod("c2", "monitoring", "prom", map[string]string{}), "namespace monitoring is excluded"},
		{skippedPod("c3", "shop", "runtime-opt-out", map[string]string{AnnotationInject: "false"}), `annotation meshless.io/inject is "false"`},
		{skippedPod("c4", "shop", "api-opt-out", nil), `annotation meshless.io/inject is "false"`},
	}
	for _, tc := range cases {
		e, err := f.agent.Enroll(ctx, tc.pod)
		if err != nil {
			t.Fatalf("enroll %s: %v", tc.pod.Name, err)
		}
		if e.Skipped != tc.want || e.SPIFFEID != "" {
			t.Errorf("%s: skipped %q, SPIFFE ID %q; want skipped %q and no identity", tc.pod.Name, e.Skipped, e.SPIFFEID, tc.want)
		}
		if got := r.get(tc.pod.Name); got != "skipped: "+tc.want {
			t.Errorf("%s: reported %q", tc.pod.Name, got)
		}
		got, err := f.agent.Get(ctx, tc.pod.ContainerID)
		if err != nil || got.Skipped != tc.want {
			t.Errorf("%s: Get = (%+v, %v), want the skipped record", tc.pod.Name, got, err)
		}
	}
	last := cases[len(cases)-1].pod.ContainerID
	if st := f.agent.Status(ctx); st.Pods != 0 || st.Skipped != 1 {
		t.Errorf("status counts %d served and %d skipped, want 0 and 1 (each pod of the same netns replaces the one before)", st.Pods, st.Skipped)
	}
	if _, err := f.agent.Get(ctx, cases[0].pod.ContainerID); err == nil {
		t.Error("an enrollment of a netns that was enrolled again under another container ID is still known")
	}
	if n := len(f.logs.Records("pod skipped")); n != len(cases) {
		t.Errorf("%d 'pod skipped' log lines, want %d", n, len(cases))
	}

	// A restarted daemon keeps the decision, and DEL forgets a skipped pod like any other.
	f.close()
	again := newAgent(t, tunnel.Strict, stateDir, caDir)
	again.agent.Restore()
	if e, err := again.agent.Get(ctx, last); err != nil || e.Skipped == "" {
		t.Errorf("after restart: Get = (%+v, %v), want the skipped record", e, err)
	}
	if !again.agent.Known(cases[len(cases)-1].pod.UID) {
		t.Error("after restart: the skipped pod's UID is not known")
	}
	if err := again.agent.Remove(ctx, last); err != nil {
		t.Fatal(err)
	}
	if _, err := again.agent.Get(ctx, last); err == nil {
		t.Error("a removed skipped pod is still known")
	}
}

// The runtime's annotations are the pod's own: when the runtime passes them, an opt-out the API
// shows (a stale or a different pod) does not override them; other values of the annotation do not
// opt out.
func TestPolicyServesPodsThatDoNotOptOut(t *testing.T) {
	node := podnet.NewNode(t, "mlpol-")
	a, b := node.AddPod(t, 1), node.AddPod(t, 2)
	caDir := t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	f := newAgent(t, tunnel.Strict, t.TempDir(), caDir)
	r := withPolicy(f, apiDirectory{"a": {AnnotationInject: "false"}}, "kube-system")
	for _, tc := range []struct {
		pod         *podnet.Pod
		name        string
		annotations map[string]string
	}{
		{a, "a", map[string]string{}},
		{b, "b", map[string]string{AnnotationInject: "true"}},
	} {
		e, err := f.agent.Enroll(context.Background(), enroll.Pod{
			ContainerID: "c-" + tc.name, IfName: "eth0", Netns: tc.pod.Netns, Namespace: "shop", Name: tc.name,
			IPs: tc.pod.IPs, Annotations: tc.annotations,
		})
		if err != nil {
			t.Fatalf("enroll %s: %v", tc.name, err)
		}
		if e.Skipped != "" || !strings.HasSuffix(e.SPIFFEID, "/ns/shop/sa/web") {
			t.Errorf("%s: skipped %q, SPIFFE ID %q; want it served as shop/web", tc.name, e.Skipped, e.SPIFFEID)
		}
		if got := r.get(tc.name); got != StatusEnrolled {
			t.Errorf("%s: reported %q, want %q", tc.name, got, StatusEnrolled)
		}
	}
}

// Uninstall releases the pods: their capture rules go, so they talk directly (in plaintext)
// instead of being refused, and nothing is left for a next daemon to restore.
func TestUninstallReleasesPods(t *testing.T) {
	node := podnet.NewNode(t, "mlrel-")
	client, server := node.AddPod(t, 1), node.AddPod(t, 2)
	caDir, stateDir := t.TempDir(), t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	podnet.EchoServer(t, server, 8080)
	f := newAgent(t, tunnel.Strict, stateDir, caDir)
	f.enroll(t, client, "client")
	f.enroll(t, server, "server")

	released, err := f.agent.Uninstall()
	if err != nil || released != 2 {
		t.Fatalf("Uninstall = (%d, %v), want 2 pods released", released, err)
	}
	if st := f.agent.Status(context.Background()); st.Pods != 0 {
		t.Errorf("%d pods still served after Uninstall", st.Pods)
	}
	c, err := podnet.Dial(client, netip.AddrPortFrom(server.IPs[0], 8080))
	if err != nil {
		t.Fatalf("after Uninstall the pods cannot talk: %v", err)
	}
	greeting, echo := exchange(t, c, "direct")
	c.Close()
	if greeting != "from "+client.IPs[0].String() || echo != "direct" {
		t.Fatalf("after Uninstall: %q %q", greeting, echo)
	}
	if n := len(f.logs.Records("connection")); n != 0 {
		t.Errorf("%d connections went through the daemon after Uninstall", n)
	}
	f.close()
	again := newAgent(t, tunnel.Strict, stateDir, caDir)
	if n := again.agent.Restore(); n != 0 {
		t.Errorf("a restarted daemon re-attached %d released pods", n)
	}
}
