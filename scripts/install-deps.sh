#!/usr/bin/env bash
# Installs what building and testing need, when missing: DCMTK (reference
# DICOM clients and storescp), dicom3tools (dciodvfy), protoc (gRPC codegen),
# cmake and g++ (CharLS, the JPEG-LS codec), gdcmconv (JPEG 2000 test files),
# pynetdicom (a second, independent DICOM implementation for tests), and
# Python grpcio with reflection and health (a gRPC client we did not write),
# and moto's S3-compatible server (the S3 blob store's tests).
# `--bench` also installs Orthanc and hyperfine for the benchmarks.
set -euo pipefail

need=()
[ -x /usr/bin/storescu ] || need+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need+=(dicom3tools)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v sqlite3 >/dev/null || need+=(sqlite3)
# CharLS (JPEG-LS decoding, via dicom-rs's `charls` feature) is C++ built with CMake.
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
# gdcmconv writes JPEG 2000 test files (DCMTK has no JPEG 2000 encoder).
[ -x /usr/bin/gdcmconv ] || need+=(libgdcm-tools)
# unshare: the full-disk tests give the gateway a tmpfs of its own.
[ -x /usr/bin/unshare ] || need+=(util-linux)
if [ "${1:-}" = "--bench" ]; then
    [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
    command -v curl >/dev/null || need+=(curl)
fi

if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! python3 -c 'import pynetdicom' 2>/dev/null; then
    echo "installing: pynetdicom (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check 'pynetdicom>=2.1,<3' 'pydicom>=2.4,<4'
fi
if ! python3 -c 'import grpc, grpc_reflection, grpc_health' 2>/dev/null; then
    echo "installing: grpcio, grpcio-reflection, grpcio-health-checking (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check \
        'grpcio>=1.60,<2' 'grpcio-reflection>=1.60,<2' 'grpcio-health-checking>=1.60,<2'
fi
if ! command -v moto_server >/dev/null; then
    echo "installing: moto[server] (PyPI; an S3-compatible server for tests)"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
fi
# Orthanc's package starts a system service; benchmarks run their own instance.
if [ "${1:-}" = "--bench" ] && command -v service >/dev/null; then
    service orthanc stop >/dev/null 2>&1 || true
fi
