package enrollhttp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshless/meshless/internal/testserve"
	"github.com/meshless/meshless/pkg/enroll"
)

// fakeService keeps pods in memory; failWith, when set, is returned by every method.
type fakeService struct {
	mu       sync.Mutex
	pods     map[string]enroll.Enrollment
	keeps    [][]string
	failWith error
	status   enroll.Status
}

func newFakeService() *fakeService {
	return &fakeService{pods: map[string]enroll.Enrollment{}, status: enroll.Status{Node: "node-1", Backend: "nft", Ready: true, TrustDomain: "cluster.local", Mode: "strict"}}
}

func (f *fakeService) Enroll(_ context.Context, p enroll.Pod) (enroll.Enrollment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return enroll.Enrollment{}, f.failWith
	}
	e := enroll.Enrollment{Pod: p, SPIFFEID: "spiffe://cluster.local/ns/" + p.Namespace + "/sa/default", EnrolledAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	f.pods[p.ContainerID] = e
	return e, nil
}

func (f *fakeService) Remove(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return f.failWith
	}
	delete(f.pods, id)
	return nil
}

func (f *fakeService) Get(_ context.Context, id string) (enroll.Enrollment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return enroll.Enrollment{}, f.failWith
	}
	e, ok := f.pods[id]
	if !ok {
		return enroll.Enrollment{}, fmt.Errorf("container %s: %w", id, enroll.ErrNotFound)
	}
	return e, nil
}

func (f *fakeService) GC(_ context.Context, keep []string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return nil, f.failWith
	}
	f.keeps = append(f.keeps, keep)
	var removed []string
	for id := range f.pods {
		if !slices.Contains(keep, id) {
			removed = append(removed, id)
			delete(f.pods, id)
		}
	}
	slices.Sort(removed)
	return removed, nil
}

func (f *fakeService) Status(context.Context) enroll.Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.status
	s.Pods = len(f.pods)
	return s
}

// serve runs Handler(svc) on a fresh socket and returns its path.
func serve(t *testing.T, svc enroll.Service) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "cni.sock")
	l, err := enroll.Listen(path)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	testserve.Serve(t, l, Handler(svc))
	return path
}

func TestClientHandlerRoundTrip(t *testing.T) {
	svc := newFakeService()
	c := enroll.NewClient(serve(t, svc))
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if want := (enroll.Status{Node: "node-1", Backend: "nft", Ready: true, TrustDomain: "cluster.local", Mode: "strict"}); st != want {
		t.Errorf("Status = %+v, want %+v", st, want)
	}

	p := validPod()
	e, err := c.Enroll(ctx, p)
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	if !reflect.DeepEqual(e.Pod, p) || e.SPIFFEID != "spiffe://cluster.local/ns/default/sa/default" || !e.EnrolledAt.Equal(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Errorf("Enroll = %+v", e)
	}
	got, err := c.Get(ctx, p.ContainerID)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if !reflect.DeepEqual(got.Pod, p) {
		t.Errorf("Get = %+v, want pod %+v", got.Pod, p)
	}
	if st, _ := c.Status(ctx); st.Pods != 1 {
		t.Errorf("Status.Pods = %d, want 1", st.Pods)
	}

	other := validPod()
	other.ContainerID = "other"
	if _, err := c.Enroll(ctx, other); err != nil {
		t.Fatalf("Enroll other: %v", err)
	}
	removed, err := c.GC(ctx, []string{p.ContainerID})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	if !slices.Equal(removed, []string{"other"}) {
		t.Errorf("GC removed %q, want [other]", removed)
	}
	if !slices.Equal(svc.keeps[0], []string{p.ContainerID}) {
		t.Errorf("service got keep %q", svc.keeps[0])
	}

	if err := c.Remove(ctx, p.ContainerID); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if err := c.Remove(ctx, p.ContainerID); err != nil {
		t.Fatalf("Remove twice: %v", err)
	}
	if _, err := c.Get(ctx, p.ContainerID); !errors.Is(err, enroll.ErrNotFound) {
		t.Errorf("Get after Remove = %v, want ErrNotFound", err)
	}

	// A nil keep list is sent as [] (forget everything), never as a missing list.
	if _, err := c.Enroll(ctx, p); err != nil {
		t.Fatal(err)
	}
	removed, err = c.GC(ctx, nil)
	if err != nil {
		t.Fatalf("GC(nil): %v", err)
	}
	if !slices.Equal(removed, []string{p.ContainerID}) {
		t.Errorf("GC(nil) removed %q", removed)
	}
}

func TestErrorMapping(t *testing.T) {
	svc := newFakeService()
	path := serve(t, svc)
	c := enroll.NewClient(path)
	ctx := context.Background()

	t.Run("invalid pod is refused before the service sees it", func(t *testing.T) {
		p := validPod()
		p.Netns = "/nonexistent/netns"
		_, err := c.Enroll(ctx, p)
		if !errors.Is(err, enroll.ErrInvalid) || !strings.Contains(err.Error(), "does not exist") {
			t.Errorf("Enroll = %v, want ErrInvalid naming the netns", err)
		}
		if len(svc.pods) != 0 {
			t.Errorf("service got pods %v", svc.pods)
		}
	})
	t.Run("not ready: the runtime is told to retry, the service never sees the pod", func(t *testing.T) {
		svc.mu.Lock()
		svc.status.Ready = false
		svc.mu.Unlock()
		defer func() {
			svc.mu.Lock()
			svc.status.Ready = true
			svc.mu.Unlock()
		}()
		_, err := c.Enroll(ctx, validPod())
		if !errors.Is(err, enroll.ErrNotReady) || errors.Is(err, enroll.ErrInvalid) || !strings.Contains(err.Error(), "not ready") {
			t.Errorf("Enroll = %v, want ErrNotReady", err)
		}
		svc.mu.Lock()
		n := len(svc.pods)
		svc.mu.Unlock()
		if n != 0 {
			t.Errorf("service got %d pods while not ready", n)
		}
	})
	t.Run("invalid container id", func(t *testing.T) {
		if _, err := c.Get(ctx, "-x"); !errors.Is(err, enroll.ErrInvalid) {
			t.Errorf("Get(-x) = %v, want ErrInvalid", err)
		}
		if _, err := c.GC(ctx, []string{"ok", "bad id"}); !errors.Is(err, enroll.ErrInvalid) {
			t.Errorf("GC with a bad id = %v, want ErrInvalid", err)
		}
	})
	t.Run("service errors", func(t *testing.T) {
		for _, tc := range []struct {
			err  error
			want int
			is   error
		}{
			{fmt.Errorf("netns vanished: %w", enroll.ErrInvalid), http.StatusBadRequest, enroll.ErrInvalid},
			{fmt.Errorf("gone: %w", enroll.ErrNotFound), http.StatusNotFound, enroll.ErrNotFound},
			{errors.New("disk full"), http.StatusInternalServerError, nil},
		} {
			svc.mu.Lock()
			svc.failWith = tc.err
			svc.mu.Unlock()
			_, err := c.Enroll(ctx, validPod())
			if err == nil || !strings.Contains(err.Error(), tc.err.Error()) {
				t.Errorf("Enroll = %v, want the daemon's message %q", err, tc.err)
			}
			for _, sentinel := range []error{enroll.ErrInvalid, enroll.ErrNotFound} {
				if errors.Is(err, sentinel) != (sentinel == tc.is) {
					t.Errorf("errors.Is(%v, %v) = %v", err, sentinel, !(sentinel == tc.is))
				}
			}
			if code, msg := rawRequest(t, path, "GET", "/v1/pods/some-id", ""); code != tc.want || msg != tc.err.Error() {
				t.Errorf("GET with %q: %d %q, want %d and the daemon's message", tc.err, code, msg, tc.want)
			}
		}
		svc.mu.Lock()
		svc.failWith = nil
		svc.mu.Unlock()
	})
	t.Run("raw requests", func(t *testing.T) {
		for _, tc := range []struct {
			method, path, body string
			want               int
			msg                string
		}{
			{"POST", "/v1/gc", `{}`, 400, `"keep" is required`},
			{"POST", "/v1/gc", `{"keep":null}`, 400, `"keep" is required`},
			{"POST", "/v1/pods", `{"containerID":`, 400, "not valid JSON"},
			{"POST", "/v1/pods", `{"ips":["300.1.1.1"]}`, 400, "not valid JSON"},
			{"POST", "/v1/pods", `{} {}`, 400, "more than one JSON value"},
			{"POST", "/v1/pods", `{"containerID":"` + strings.Repeat("a", 2<<20) + `"}`, 400, "larger than"},
			{"GET", "/v1/pods/unknown", ``, 404, "pod not enrolled"},
		} {
			if code, msg := rawRequest(t, path, tc.method, tc.path, tc.body); code != tc.want || !strings.Contains(msg, tc.msg) {
				t.Errorf("%s %s %.40s: got %d %q, want %d containing %q", tc.method, tc.path, tc.body, code, msg, tc.want, tc.msg)
			}
		}
	})
}

// rawRequest sends one request with net/http's client and returns the answer's status and the
// message of its JSON error body ("" for a success).
func rawRequest(t *testing.T, socket, method, path, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://x"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 300 {
		return resp.StatusCode, ""
	}
	var eb enroll.ErrorBody
	if err := json.NewDecoder(resp.Body).Decode(&eb); err != nil {
		t.Fatalf("%s %s: %d answer is not a JSON error: %v", method, path, resp.StatusCode, err)
	}
	return resp.StatusCode, eb.Error
}

// validPod is a pod that passes enroll.Pod.Validate: its netns is this process's.
func validPod() enroll.Pod {
	return enroll.Pod{
		ContainerID: "0123456789abcdef",
		IfName:      "eth0",
		Netns:       "/proc/self/ns/net",
		Namespace:   "default",
		Name:        "web-7d4b9c6f5-x2x9q",
		UID:         "8b8f7f0e-3c1a-4e0b-9a57-3f0d2b8a1c11",
		IPs:         []netip.Addr{netip.MustParseAddr("10.244.1.7"), netip.MustParseAddr("fd00:10:244::7")},
	}
}
