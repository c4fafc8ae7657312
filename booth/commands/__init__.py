"""booth's commands, one module per group, each with its own typer.Typer (added in booth.cli):

    chat.py     booth chat
    replay.py   booth replay, booth demo
    ls.py       booth ls
    tools.py    booth tools, booth call, booth tiny-model
    options.py  the global options (before or after any command), tool_context(), fail()
    session.py  what chat, replay and demo share: the approval policy, the transcript header
    help.py     how the help pages show flags
"""
