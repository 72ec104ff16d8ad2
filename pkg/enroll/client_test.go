package enroll

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/textproto"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// serveHTTP serves h with Go's own HTTP server on a fresh unix socket and returns its path.
func serveHTTP(t *testing.T, h http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cni.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
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

// serveRaw answers every connection on a fresh unix socket with answer, after reading the
// request's header, and returns the socket's path. An empty answer never answers.
func serveRaw(t *testing.T, answer string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cni.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				tp := textproto.NewReader(bufio.NewReader(conn))
				if _, err := tp.ReadLine(); err != nil {
					return
				}
				if _, err := tp.ReadMIMEHeader(); err != nil {
					return
				}
				if answer == "" {
					time.Sleep(5 * time.Second)
					return
				}
				_, _ = conn.Write([]byte(answer))
			}()
		}
	}()
	return path
}

// TestClientSpeaksHTTP checks the client against Go's HTTP server framing answers each way it
// can: a short answer with Content-Length, a long one in chunks, and the mux's own plain-text 404.
func TestClientSpeaksHTTP(t *testing.T) {
	var ids []string
	for i := range 3000 {
		ids = append(ids, fmt.Sprintf("container-%04d", i))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/gc", func(w http.ResponseWriter, r *http.Request) {
		var req GCRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Keep == nil {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		// Long enough for the server to send it in chunks.
		_ = json.NewEncoder(w).Encode(GCResponse{Removed: ids})
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(Status{Node: "node-1", Backend: "nft", Ready: true})
	})
	c := NewClient(serveHTTP(t, mux))
	ctx := context.Background()

	removed, err := c.GC(ctx, nil)
	if err != nil || !slices.Equal(removed, ids) {
		t.Errorf("GC = %d IDs, %v; want the %d IDs sent", len(removed), err, len(ids))
	}
	st, err := c.Status(ctx)
	if err != nil || st != (Status{Node: "node-1", Backend: "nft", Ready: true}) {
		t.Errorf("Status = %+v, %v", st, err)
	}
	// A 404 that is not an API answer is not ErrNotFound: it means another program (or version).
	_, err = c.Get(ctx, "abc")
	if err == nil || errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "404 Not Found: 404 page not found") {
		t.Errorf("Get on an unknown route = %v, want a plain 404 error", err)
	}
}

func TestClientReadsFraming(t *testing.T) {
	const status = `{"node":"n","backend":"legacy","ready":true}`
	for _, tc := range []struct {
		name, answer string
	}{
		{"content length", "HTTP/1.1 200 OK\r\nContent-Length: " + fmt.Sprint(len(status)) + "\r\n\r\n" + status},
		{"until close", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + status},
		{"chunks with an extension and a trailer", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" +
			"5;x=y\r\n" + status[:5] + "\r\n" + fmt.Sprintf("%x", len(status)-5) + "\r\n" + status[5:] + "\r\n0\r\nX-Trailer: 1\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := NewClient(serveRaw(t, tc.answer)).Status(context.Background())
			if err != nil || st != (Status{Node: "n", Backend: "legacy", Ready: true}) {
				t.Errorf("Status = %+v, %v", st, err)
			}
		})
	}
}

func TestClientRefusesMalformedAnswers(t *testing.T) {
	for _, answer := range []string{
		"garbage\r\n\r\n",
		"HTTP/1.1 2000 OK\r\n\r\n{}",
		"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
	} {
		_, err := NewClient(serveRaw(t, answer)).Status(context.Background())
		if err == nil || errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "cannot read") {
			t.Errorf("answer %q: %v, want an error saying the answer cannot be read", answer, err)
		}
	}
	// An answer cut short is a daemon gone mid-way.
	_, err := NewClient(serveRaw(t, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")).Status(context.Background())
	if !errors.Is(err, ErrUnreachable) {
		t.Errorf("short answer: %v, want ErrUnreachable", err)
	}
}

func TestClientGivesUp(t *testing.T) {
	path := serveRaw(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := NewClient(path).Status(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "abandoned") {
		t.Errorf("Status with a daemon that never answers = %v, want it abandoned with the context", err)
	}
	if time.Since(start) > 4*time.Second {
		t.Errorf("Status returned only after %s: the context's end did not stop the wait", time.Since(start))
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
