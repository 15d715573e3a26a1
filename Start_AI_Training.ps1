<#
.SYNOPSIS
    Start (or resume) an OppaiOracle training run on Windows.

.DESCRIPTION
    Finds or creates the virtual environment, installs requirements.txt when it changed (with
    -CudaTorch: the CUDA build of torch from the PyTorch wheel index first), sources an optional
    user environment file, then runs train_direct.py and returns its exit code. Everything else
    lives in Python. Works in Windows PowerShell 5.1 and PowerShell 7.

.EXAMPLE
    .\Start_AI_Training.ps1
    .\Start_AI_Training.ps1 -Config configs\my_run.yaml -Set "data.root=D:\booru","data.num_workers=12" -CudaTorch
    .\Start_AI_Training.ps1 -Config configs\my_run.yaml -Resume latest
    .\Start_AI_Training.ps1 -Config configs\my_run.yaml -Resume latest -ExtraArgs "--accept-data-change"
    .\Start_AI_Training.ps1 -Config configs\my_run.yaml -NProcPerNode 2
#>
[CmdletBinding()]
param(
    # The YAML config (every key is documented in configs\unified_config.yaml).
    [string]$Config = "configs\demo.yaml",
    # 'latest' or a checkpoint folder; empty = start a new run.
    [string]$Resume = "",
    # Config overrides, each "section.key=value".
    [string[]]$Set = @(),
    # Further train_direct.py arguments, e.g. "--accept-data-change" or "--accept-schedule-change".
    [string[]]$ExtraArgs = @(),
    # Install the CUDA build of torch from the PyTorch wheel index before the requirements.
    [switch]$CudaTorch,
    [string]$TorchIndexUrl = "https://download.pytorch.org/whl/cu128",
    # Where the virtual environment lives (created when missing).
    [string]$VenvDir = ".venv",
    # A PowerShell file of your own settings (paths, CUDA_VISIBLE_DEVICES, ...), sourced if present.
    [string]$EnvFile = "payton_env.ps1",
    # The Python that creates the environment; default: the py launcher, else python on PATH.
    [string]$Python = "",
    # Processes (GPUs) on this machine; more than 1 runs through torchrun.
    [int]$NProcPerNode = 1,
    # Skip the requirements check.
    [switch]$SkipInstall,
    # Print the command that would run, and stop.
    [switch]$DryRun
)

Set-StrictMode -Version Latest
$ErrorActionPreference = "Stop"
Set-Location -LiteralPath $PSScriptRoot

function Get-VenvPython([string]$Dir) {
    if ($env:OS -eq "Windows_NT") { return (Join-Path (Join-Path $Dir "Scripts") "python.exe") }
    return (Join-Path (Join-Path $Dir "bin") "python")
}

function Get-BasePython {
    if ($Python) { return @($Python) }
    if (Get-Command py -ErrorAction SilentlyContinue) { return @("py", "-3") }
    if (Get-Command python -ErrorAction SilentlyContinue) { return @("python") }
    if (Get-Command python3 -ErrorAction SilentlyContinue) { return @("python3") }
    throw "No Python found: install Python 3.10+ or pass -Python C:\path\to\python.exe"
}

function Invoke-Checked([string]$Exe, [string[]]$Arguments) {
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "'$Exe $($Arguments -join ' ')' failed with exit code $LASTEXITCODE" }
}

# Python output as UTF-8 whatever the console code page.
$env:PYTHONUTF8 = "1"
$env:PYTHONIOENCODING = "utf-8"

if (Test-Path -LiteralPath $EnvFile) {
    Write-Host "Loading settings from $EnvFile"
    . (Resolve-Path -LiteralPath $EnvFile).Path
}

$venvPython = Get-VenvPython $VenvDir
$trainArgs = @("train_direct.py", "--config", $Config)
foreach ($override in $Set) { $trainArgs += @("--set", $override) }
if ($Resume) { $trainArgs += @("--resume", $Resume) }
$trainArgs += $ExtraArgs
if ($NProcPerNode -gt 1) {
    $trainArgs = @("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "$NProcPerNode") + $trainArgs
}

if ($DryRun) {
    Write-Output ("$venvPython " + ($trainArgs -join " "))
    exit 0
}

if (-not (Test-Path -LiteralPath $venvPython)) {
    $base = @(Get-BasePython)
    Write-Host "Creating the virtual environment in $VenvDir"
    $baseArgs = @()
    if ($base.Count -gt 1) { $baseArgs = @($base[1..($base.Count - 1)]) }
    Invoke-Checked $base[0] ($baseArgs + @("-m", "venv", $VenvDir))
}

if (-not $SkipInstall) {
    $stamp = Join-Path $VenvDir "requirements.sha256"
    $wanted = (Get-FileHash -Algorithm SHA256 -LiteralPath "requirements.txt").Hash + "|cuda=$CudaTorch"
    $have = ""
    if (Test-Path -LiteralPath $stamp) { $have = (Get-Content -LiteralPath $stamp -Raw).Trim() }
    if ($have -ne $wanted) {
        Invoke-Checked $venvPython @("-m", "pip", "install", "--upgrade", "pip")
        if ($CudaTorch) {
            Invoke-Checked $venvPython @("-m", "pip", "install", "torch", "torchvision", "--index-url", $TorchIndexUrl)
        }
        Invoke-Checked $venvPython @("-m", "pip", "install", "-r", "requirements.txt")
        Set-Content -LiteralPath $stamp -Value $wanted -Encoding ASCII
    }
}

Write-Host ("Running: $venvPython " + ($trainArgs -join " "))
& $venvPython @trainArgs
exit $LASTEXITCODE
