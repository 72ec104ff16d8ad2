package enroll

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// maxBodyBytes bounds request bodies: a pod is well under 4 KiB, a GC keep list of a few
// thousand container IDs well under 1 MiB.
const maxBodyBytes = 1 << 20

// GCRequest is the body of POST /v1/gc.
type GCRequest struct {
	// Keep lists the container IDs that are still valid; it must be present, and an empty list
	// forgets every pod.
	Keep []string `json:"keep"`
}

// GCResponse is the answer to POST /v1/gc.
type GCResponse struct {
	Removed []string `json:"removed"`
}

type errorBody struct {
	Error string `json:"error"`
}

// Handler serves s over HTTP:
//
//	POST   /v1/pods                enroll a Pod, answers its Enrollment
//	GET    /v1/pods/{containerID}  answers the Enrollment
//	DELETE /v1/pods/{containerID}  forgets the pod (204)
//	POST   /v1/gc                  GCRequest, answers GCResponse
//	GET    /v1/status              answers Status
//
// Errors are {"error": "..."} with 400 for ErrInvalid, 404 for ErrNotFound, 503 for ErrNotReady,
// 500 otherwise.
func Handler(s Service) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		var p Pod
		if err := decodeBody(w, r, &p); err != nil {
			writeError(w, err)
			return
		}
		// Validated here so that no Service implementation ever sees a pod it cannot use.
		if err := p.Validate(); err != nil {
			writeError(w, err)
			return
		}
		if !s.Status(r.Context()).Ready {
			writeError(w, fmt.Errorf("%w: it is re-attaching the pods it served before it restarted", ErrNotReady))
			return
		}
		e, err := s.Enroll(r.Context(), p)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, e)
	})
	mux.HandleFunc("GET /v1/pods/{containerID}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("containerID")
		if err := ValidateContainerID(id); err != nil {
			writeError(w, err)
			return
		}
		e, err := s.Get(r.Context(), id)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, e)
	})
	mux.HandleFunc("DELETE /v1/pods/{containerID}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("containerID")
		if err := ValidateContainerID(id); err != nil {
			writeError(w, err)
			return
		}
		if err := s.Remove(r.Context(), id); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /v1/gc", func(w http.ResponseWriter, r *http.Request) {
		var req GCRequest
		if err := decodeBody(w, r, &req); err != nil {
			writeError(w, err)
			return
		}
		// A missing list must not be read as "keep nothing": that would tear down every pod.
		if req.Keep == nil {
			writeError(w, fmt.Errorf(`%w: "keep" is required (send [] to forget every pod)`, ErrInvalid))
			return
		}
		for _, id := range req.Keep {
			if err := ValidateContainerID(id); err != nil {
				writeError(w, fmt.Errorf("keep: %w", err))
				return
			}
		}
		removed, err := s.GC(r.Context(), req.Keep)
		if err != nil {
			writeError(w, err)
			return
		}
		if removed == nil {
			removed = []string{}
		}
		writeJSON(w, http.StatusOK, GCResponse{Removed: removed})
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Status(r.Context()))
	})
	return mux
}

func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err := dec.Decode(v); err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return fmt.Errorf("%w: body larger than %d bytes", ErrInvalid, mbe.Limit)
		}
		return fmt.Errorf("%w: body is not valid JSON: %w", ErrInvalid, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: body holds more than one JSON value", ErrInvalid)
	}
	return nil
}

func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrInvalid):
		code = http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, ErrNotReady):
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, errorBody{Error: err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	// The status line is already sent; a failed write means the client went away.
	_ = json.NewEncoder(w).Encode(v)
}

// Listen opens the unix socket at path for Handler: it creates the parent directory (0700) if
// needed, replaces a stale socket left by a daemon that died, refuses to take over a socket that
// another process still serves or a path that is not a socket, and makes the socket 0600 so that
// only root can enroll pods.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create directory for socket %s: %w", path, err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restrict socket %s to root: %w", path, err)
	}
	return l, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket path %s exists and is not a socket; remove it or choose another socket path", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("socket %s is in use by another process (is another meshlessd running on this node?)", path)
	}
	// Only a refused connection proves that nobody serves the socket any more.
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s exists and cannot be probed: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}
