package enroll

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshless/meshless/internal/testserve"
)

// answering serves handler on a fresh socket with net/http's server, as meshlessd does, and
// returns its path.
func answering(t *testing.T, handler http.HandlerFunc) string {
	t.Helper()
	l, err := Listen(filepath.Join(t.TempDir(), "cni.sock"))
	if err != nil {
		t.Fatal(err)
	}
	testserve.Serve(t, l, handler)
	return l.Addr().String()
}

// TestClientAnswers runs the client against net/http's server: what it sends, and how it reads
// answers of every kind, large ones included (net/http would chunk them for an HTTP/1.1 client).
func TestClientAnswers(t *testing.T) {
	ctx := context.Background()
	big := strings.Repeat("x", 3*maxErrorText)
	path := answering(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Proto != "HTTP/1.0" || r.Host != "meshlessd" {
			http.Error(w, "unexpected "+r.Proto+" request for "+r.Host, http.StatusTeapot)
			return
		}
		switch r.URL.Path {
		case "/v1/status":
			w.Write([]byte(`{"node":"` + big + `","ready":true}`))
		case "/v1/gc":
			var req GCRequest
			if r.Header.Get("Content-Type") != "application/json" || json.NewDecoder(r.Body).Decode(&req) != nil {
				http.Error(w, "bad body", http.StatusTeapot)
				return
			}
			json.NewEncoder(w).Encode(GCResponse{Removed: req.Keep})
		case "/v1/pods/invalid":
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(ErrorBody{Error: "invalid request: bad id"})
		case "/v1/pods/gone":
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(ErrorBody{Error: "pod not enrolled"})
		case "/v1/pods/busy":
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(ErrorBody{Error: "meshlessd not ready"})
		case "/v1/pods/garbled":
			w.Write([]byte("not json"))
		case "/v1/pods/huge-error":
			http.Error(w, big, http.StatusBadGateway)
		default:
			http.NotFound(w, r)
		}
	})
	c := NewClient(path)

	st, err := c.Status(ctx)
	if err != nil || st.Node != big || !st.Ready {
		t.Errorf("Status = %.40v…, %v; want the large answer", st, err)
	}
	if removed, err := c.GC(ctx, []string{"a", "b"}); err != nil || len(removed) != 2 {
		t.Errorf("GC = %v, %v; want the keep list echoed", removed, err)
	}
	for _, tc := range []struct {
		id     string
		status int
		api    bool
		is     error
		msg    string
	}{
		{"invalid", 400, true, ErrInvalid, "bad id"},
		{"gone", 404, true, ErrNotFound, "pod not enrolled"},
		{"busy", 503, true, ErrNotReady, "not ready"},
		{"unknown/route", 404, false, nil, "404 Not Found: 404 page not found"},
		{"huge-error", 502, false, nil, "502 Bad Gateway: xxx"},
	} {
		_, err := c.Get(ctx, tc.id)
		var re *remoteError
		if !errors.As(err, &re) || re.status != tc.status || re.api != tc.api || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("Get(%s) = %v, want status %d (API %v) with %q", tc.id, err, tc.status, tc.api, tc.msg)
			continue
		}
		if len(re.message) > maxErrorText+len("502 Bad Gateway: ") {
			t.Errorf("Get(%s): message of %d bytes, want at most %d of the answer", tc.id, len(re.message), maxErrorText)
		}
		for _, sentinel := range []error{ErrInvalid, ErrNotFound, ErrNotReady} {
			if errors.Is(err, sentinel) != (sentinel == tc.is) {
				t.Errorf("Get(%s): errors.Is(%v) = %v", tc.id, sentinel, !(sentinel == tc.is))
			}
		}
	}
	if _, err := c.Get(ctx, "garbled"); err == nil || !strings.Contains(err.Error(), "not valid JSON") {
		t.Errorf("Get(garbled) = %v, want an invalid JSON error", err)
	}
}

// TestReadAnswerRefusesGarbage: what is not an HTTP answer of bounded size is an error.
func TestReadAnswerRefusesGarbage(t *testing.T) {
	for name, raw := range map[string]string{
		"empty":           "",
		"not HTTP":        "SSH-2.0-OpenSSH\r\n\r\n",
		"bad code":        "HTTP/1.0 2x0 OK\r\n\r\n",
		"unterminated":    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n",
		"header garbage":  "HTTP/1.0 200 OK\r\nno colon here\r\n\r\n{}",
		"larger than max": "HTTP/1.0 200 OK\r\n\r\n" + strings.Repeat("x", maxAnswer+1),
	} {
		if a, err := readAnswer(strings.NewReader(raw)); err == nil {
			t.Errorf("%s: readAnswer = %+v, want an error", name, a.status)
		}
	}
	a, err := readAnswer(strings.NewReader("HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"))
	if err != nil || a.code != 204 || a.status != "204 No Content" || len(a.body) != 0 {
		t.Errorf("readAnswer(204) = %+v, %v", a, err)
	}
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
