//go:build tools

// Package tools pins the API types controller-gen reads.
package tools

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
