package enroll

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeService keeps pods in memory; failWith, when set, is returned by every method.
type fakeService struct {
	mu       sync.Mutex
	pods     map[string]Enrollment
	keeps    [][]string
	failWith error
	status   Status
}

func newFakeService() *fakeService {
	return &fakeService{pods: map[string]Enrollment{}, status: Status{Node: "node-1", Backend: "nft", Ready: true, TrustDomain: "cluster.local", Mode: "strict"}}
}

func (f *fakeService) Enroll(_ context.Context, p Pod) (Enrollment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return Enrollment{}, f.failWith
	}
	e := Enrollment{Pod: p, SPIFFEID: "spiffe://cluster.local/ns/" + p.Namespace + "/sa/default", EnrolledAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
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

func (f *fakeService) Get(_ context.Context, id string) (Enrollment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return Enrollment{}, f.failWith
	}
	e, ok := f.pods[id]
	if !ok {
		return Enrollment{}, fmt.Errorf("container %s: %w", id, ErrNotFound)
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

func (f *fakeService) Status(context.Context) Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.status
	s.Pods = len(f.pods)
	return s
}

// serve runs Handler(svc) on a fresh socket and returns its path.
func serve(t *testing.T, svc Service) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "cni.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	srv := &http.Server{Handler: Handler(svc), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return path
}

func TestClientHandlerRoundTrip(t *testing.T) {
	svc := newFakeService()
	c := NewClient(serve(t, svc))
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if want := (Status{Node: "node-1", Backend: "nft", Ready: true, TrustDomain: "cluster.local", Mode: "strict"}); st != want {
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
	if _, err := c.Get(ctx, p.ContainerID); !errors.Is(err, ErrNotFound) {
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
	c := NewClient(path)
	ctx := context.Background()

	t.Run("invalid pod is refused before the service sees it", func(t *testing.T) {
		p := validPod()
		p.Netns = "/nonexistent/netns"
		_, err := c.Enroll(ctx, p)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "does not exist") {
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
		if !errors.Is(err, ErrNotReady) || errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "not ready") {
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
		if _, err := c.Get(ctx, "-x"); !errors.Is(err, ErrInvalid) {
			t.Errorf("Get(-x) = %v, want ErrInvalid", err)
		}
		if _, err := c.GC(ctx, []string{"ok", "bad id"}); !errors.Is(err, ErrInvalid) {
			t.Errorf("GC with a bad id = %v, want ErrInvalid", err)
		}
	})
	t.Run("service errors", func(t *testing.T) {
		for _, tc := range []struct {
			err  error
			want int
			is   error
		}{
			{fmt.Errorf("netns vanished: %w", ErrInvalid), http.StatusBadRequest, ErrInvalid},
			{fmt.Errorf("gone: %w", ErrNotFound), http.StatusNotFound, ErrNotFound},
			{errors.New("disk full"), http.StatusInternalServerError, nil},
		} {
			svc.mu.Lock()
			svc.failWith = tc.err
			svc.mu.Unlock()
			_, err := c.Enroll(ctx, validPod())
			if err == nil || !strings.Contains(err.Error(), tc.err.Error()) {
				t.Errorf("Enroll = %v, want the daemon's message %q", err, tc.err)
			}
			var re *remoteError
			if !errors.As(err, &re) || re.status != tc.want {
				t.Errorf("Enroll with %q: %v, want HTTP %d", tc.err, err, tc.want)
			}
			for _, sentinel := range []error{ErrInvalid, ErrNotFound} {
				if errors.Is(err, sentinel) != (sentinel == tc.is) {
					t.Errorf("errors.Is(%v, %v) = %v", err, sentinel, !(sentinel == tc.is))
				}
			}
		}
		svc.mu.Lock()
		svc.failWith = nil
		svc.mu.Unlock()
	})
	t.Run("raw requests", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}}}
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
			req, err := http.NewRequest(tc.method, "http://x"+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			rerr := readRemoteError(resp)
			resp.Body.Close()
			var re *remoteError
			if !errors.As(rerr, &re) || re.status != tc.want || !re.api || !strings.Contains(re.message, tc.msg) {
				t.Errorf("%s %s %.40s: got %d %q (JSON %v), want %d containing %q", tc.method, tc.path, tc.body, re.status, re.message, re.api, tc.want, tc.msg)
			}
		}
	})
	t.Run("unknown route is not ErrNotFound", func(t *testing.T) {
		err := c.do(ctx, http.MethodGet, "/v2/nothing", nil, nil)
		if err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("do(/v2/nothing) = %v, want a plain error", err)
		}
	})
}

func TestClientUnreachable(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "cni.sock")
	_, err := NewClient(missing).Status(context.Background())
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("Status = %v, want ErrUnreachable", err)
	}
	for _, want := range []string{"meshlessd not reachable at " + missing, "is the meshless DaemonSet running on this node?", "no such file or directory"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}

	// A socket that nobody serves any more: connection refused.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	err = NewClient(stale).Remove(context.Background(), "abc")
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("Remove = %v, want ErrUnreachable with connection refused", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := NewClient(missing).Get(ctx, "abc"); !errors.Is(err, context.Canceled) {
		t.Errorf("Get with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestListen(t *testing.T) {
	t.Run("creates a private directory and a 0600 socket", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "a", "b")
		path := filepath.Join(dir, "cni.sock")
		l, err := Listen(path)
		if err != nil {
			t.Fatalf("Listen: %v", err)
		}
		defer l.Close()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
			t.Errorf("socket mode = %v, want socket 0600", fi.Mode())
		}
		di, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if di.Mode().Perm() != 0o700 {
			t.Errorf("directory mode = %v, want 0700", di.Mode().Perm())
		}
	})
	t.Run("replaces a stale socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "cni.sock")
		old, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		old.(*net.UnixListener).SetUnlinkOnClose(false)
		old.Close()
		l, err := Listen(path)
		if err != nil {
			t.Fatalf("Listen over a stale socket: %v", err)
		}
		l.Close()
	})
	t.Run("refuses a socket in use", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "cni.sock")
		l, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if l2, err := Listen(path); err == nil || !strings.Contains(err.Error(), "in use") {
			if l2 != nil {
				l2.Close()
			}
			t.Errorf("second Listen = %v, want an in-use error", err)
		}
	})
	t.Run("refuses a path that is not a socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "cni.sock")
		if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		if l, err := Listen(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
			if l != nil {
				l.Close()
			}
			t.Errorf("Listen over a file = %v, want a not-a-socket error", err)
		}
		if b, _ := os.ReadFile(path); string(b) != "keep me" {
			t.Error("Listen clobbered a regular file")
		}
	})
}
