// Package enrollhttp serves meshlessd's enrollment API (pkg/enroll's Service) over HTTP on its
// unix socket. It is apart from pkg/enroll so that the plugin, which imports pkg/enroll for the
// API's types and client, does not link net/http (see enroll.Client).
package enrollhttp

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/meshless/meshless/pkg/enroll"
)

// Handler serves s over HTTP:
//
//	POST   /v1/pods                enroll a Pod, answers its Enrollment
//	GET    /v1/pods/{containerID}  answers the Enrollment
//	DELETE /v1/pods/{containerID}  forgets the pod (204)
//	POST   /v1/gc                  GCRequest, answers GCResponse
//	GET    /v1/status              answers Status
//
// Errors are ErrorBody ({"error": "..."}) with 400 for ErrInvalid, 404 for ErrNotFound, 503 for
// ErrNotReady, 500 otherwise (all of package enroll).
func Handler(s enroll.Service) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		var p enroll.Pod
		if err := decodeBody(w, r, &p); err != nil {
			writeError(w, err)
			return
		}
		// Validated here so that no enroll.Service implementation ever sees a pod it cannot use.
		if err := p.Validate(); err != nil {
			writeError(w, err)
			return
		}
		if !s.Status(r.Context()).Ready {
			writeError(w, fmt.Errorf("%w: it is re-attaching the pods it served before it restarted", enroll.ErrNotReady))
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
		if err := enroll.ValidateContainerID(id); err != nil {
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
		if err := enroll.ValidateContainerID(id); err != nil {
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
		var req enroll.GCRequest
		if err := decodeBody(w, r, &req); err != nil {
			writeError(w, err)
			return
		}
		// A missing list must not be read as "keep nothing": that would tear down every pod.
		if req.Keep == nil {
			writeError(w, fmt.Errorf(`%w: "keep" is required (send [] to forget every pod)`, enroll.ErrInvalid))
			return
		}
		for _, id := range req.Keep {
			if err := enroll.ValidateContainerID(id); err != nil {
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
		writeJSON(w, http.StatusOK, enroll.GCResponse{Removed: removed})
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Status(r.Context()))
	})
	return mux
}

func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, enroll.MaxBodyBytes))
	if err := dec.Decode(v); err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return fmt.Errorf("%w: body larger than %d bytes", enroll.ErrInvalid, mbe.Limit)
		}
		return fmt.Errorf("%w: body is not valid JSON: %w", enroll.ErrInvalid, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: body holds more than one JSON value", enroll.ErrInvalid)
	}
	return nil
}

func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, enroll.ErrInvalid):
		code = http.StatusBadRequest
	case errors.Is(err, enroll.ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, enroll.ErrNotReady):
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, enroll.ErrorBody{Error: err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	// The status line is already sent; a failed write means the client went away.
	_ = json.NewEncoder(w).Encode(v)
}
