module meshlane.dev/goproxy

go 1.22
