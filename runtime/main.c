/*
 * main.c — the `dsrt` program: a Lua 5.4 interpreter with dsrt built in.
 *
 * It behaves like the stock `lua` program (same options, same `arg` table, same exit statuses, the
 * same multi-line REPL), so what people know about running Lua carries over. What it adds:
 *   - dsrt, cjson and readline are linked in, so the binary runs where no Lua is installed;
 *   - <folder of the binary>/../lua is searched first, so in a checkout build/dsrt runs the Lua
 *     files being edited, and the copy embedded in the binary is only the fallback;
 *   - `dsrt` is a global before any -e, script or REPL line runs (a failure to load it is reported
 *     once and the program goes on without it);
 *   - the REPL prints an expression's value without a leading `=`, keeps history in ~/.dsrt_history, and Ctrl-C at the prompt discards the input instead of killing
 *     the process.
 *
 * What it protects: every error reaches the user as a message with a traceback and a failing exit
 * status, never as a crash; and a running chunk can always be stopped with Ctrl-C (which raises
 * "interrupted!" at the next Lua instruction), with a second Ctrl-C killing the process as the way
 * out of a long call into C. The structure follows Lua's own lua.c.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <unistd.h>

#include <readline/history.h>
#include <readline/readline.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#include "dsrt.h"

int luaopen_cjson(lua_State *L);   /* from the static lua-cjson library the program links */

#define PROGNAME "dsrt"
#define HISTORY_FILE ".dsrt_history"
#define HISTORY_KEPT 1000
#define INIT_VAR "LUA_INIT"
#define INIT_VAR_VERSIONED INIT_VAR "_" LUA_VERSION_MAJOR "_" LUA_VERSION_MINOR

/* Messages name the program, except inside the REPL where the user knows who is talking. */
static const char *message_prefix = PROGNAME;

static void print_usage(FILE *out) {
    fputs("usage: " PROGNAME " [options] [script [args]]\n"
          "Available options are:\n"
          "  -e stat   execute string 'stat'\n"
          "  -i        enter interactive mode after executing 'script'\n"
          "  -l mod    require library 'mod' into global 'mod'\n"
          "  -l g=mod  require library 'mod' into global 'g'\n"
          "  -v        show version information\n"
          "  -E        ignore environment variables\n"
          "  -W        turn warnings on\n"
          "  -h        show this help (also --help; --version is -v)\n"
          "  --        stop handling options\n"
          "  -         stop handling options and execute stdin\n"
          "With no script and no -e, runs the REPL when stdin is a terminal, else runs stdin.\n",
          out);
}

static void print_version(void) {
    printf("%s %s (%s)\n", PROGNAME, dsrt_version(), LUA_RELEASE);
    fflush(stdout);
}

static void print_message(const char *prefix, const char *message) {
    fflush(stdout);   /* keep what the chunk printed before its error in order */
    if (prefix != NULL) fprintf(stderr, "%s: ", prefix);
    fprintf(stderr, "%s\n", message);
    fflush(stderr);
}

/* Prints the error on top of the stack, if status says there is one, and pops it. */
static int report(lua_State *L, int status) {
    if (status != LUA_OK) {
        const char *message = lua_tostring(L, -1);
        print_message(message_prefix, message != NULL ? message : "(error object is not a string)");
        lua_pop(L, 1);
    }
    return status;
}

/* The message handler of every call: turns the error into a string with a traceback. */
static int add_traceback(lua_State *L) {
    const char *message = lua_tostring(L, 1);
    if (message == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        message = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, message, 1);
    return 1;
}

/*
 * Interrupting a running chunk. A signal handler may not touch the Lua state except to set a
 * hook, so it does only that; the hook then raises the error from inside Lua, where raising is
 * safe. The handler also restores the default action, so a chunk stuck in C (where no hook runs)
 * can still be killed by a second Ctrl-C.
 */
static lua_State *running_state;

static void set_sigint_action(void (*handler)(int)) {
    struct sigaction action;
    memset(&action, 0, sizeof action);   /* no SA_RESTART: a read in the chunk returns, the hook runs */
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, NULL);
}

static void raise_interrupted(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted!");
}

static void interrupt_running_chunk(int sig) {
    (void)sig;
    set_sigint_action(SIG_DFL);
    lua_sethook(running_state, raise_interrupted,
                LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

/* Calls the function below narg arguments, like lua_pcall, with a traceback and Ctrl-C armed. */
static int call_chunk(lua_State *L, int narg, int nresults) {
    int base = lua_gettop(L) - narg;
    lua_pushcfunction(L, add_traceback);
    lua_insert(L, base);
    running_state = L;
    set_sigint_action(interrupt_running_chunk);
    int status = lua_pcall(L, narg, nresults, base);
    set_sigint_action(SIG_DFL);
    /* a Ctrl-C that came as the chunk finished must not interrupt the next one */
    if (lua_gethook(L) == raise_interrupted) lua_sethook(L, NULL, 0, 0);
    lua_remove(L, base);
    return status;
}

static int run_loaded_chunk(lua_State *L, int status) {
    if (status == LUA_OK) status = call_chunk(L, 0, 0);
    return report(L, status);
}

static int run_file(lua_State *L, const char *path) {
    return run_loaded_chunk(L, luaL_loadfile(L, path));
}

static int run_string(lua_State *L, const char *code, const char *chunkname) {
    return run_loaded_chunk(L, luaL_loadbuffer(L, code, strlen(code), chunkname));
}

/* -l mod or -l g=mod: global g (or mod) = require "mod" */
static int require_into_global(lua_State *L, const char *spec) {
    const char *equals = strchr(spec, '=');
    const char *module = equals != NULL ? equals + 1 : spec;
    lua_getglobal(L, "require");
    lua_pushstring(L, module);
    int status = call_chunk(L, 1, 1);
    if (status == LUA_OK) {
        if (equals != NULL) lua_pushlstring(L, spec, (size_t)(equals - spec));
        else lua_pushstring(L, spec);
        lua_insert(L, -2);
        lua_setglobal(L, lua_tostring(L, -2));
        lua_pop(L, 1);
    }
    return report(L, status);
}

/* Pushes arg[1..#arg] as the script's `...`. */
static int push_script_args(lua_State *L) {
    if (lua_getglobal(L, "arg") != LUA_TTABLE) luaL_error(L, "'arg' is not a table");
    int n = (int)luaL_len(L, -1);
    luaL_checkstack(L, n + 3, "too many arguments to script");
    for (int i = 1; i <= n; i++) lua_rawgeti(L, -i, i);
    lua_remove(L, -n - 1);
    return n;
}

static int run_script(lua_State *L, char **argv) {
    const char *path = argv[0];
    if (strcmp(path, "-") == 0 && strcmp(argv[-1], "--") != 0) path = NULL;   /* stdin */
    int status = luaL_loadfile(L, path);
    if (status == LUA_OK) status = call_chunk(L, push_script_args(L), LUA_MULTRET);
    return report(L, status);
}

/* arg[0] is the script, arg[1..] its arguments, arg[-1..] what came before it, as lua does. */
static void create_arg_table(lua_State *L, char **argv, int argc, int script) {
    if (script == argc) script = 0;   /* no script: arg[0] is the program */
    lua_createtable(L, argc - (script + 1), script + 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - script);
    }
    lua_setglobal(L, "arg");
}

static int run_lua_init(lua_State *L) {
    const char *chunkname = "=" INIT_VAR_VERSIONED;
    const char *init = getenv(chunkname + 1);
    if (init == NULL) {
        chunkname = "=" INIT_VAR;
        init = getenv(chunkname + 1);
    }
    if (init == NULL) return LUA_OK;
    if (init[0] == '@') return run_file(L, init + 1);
    return run_string(L, init, chunkname);
}

/* In a checkout the binary is build/dsrt and ../lua is the library being edited; searching it
   first means Lua changes need no rebuild. An installed binary with no such folder is left to
   LUA_PATH and the embedded copy. */
static void search_checkout_lua_first(lua_State *L) {
    char root[PATH_MAX];
    if (realpath("/proc/self/exe", root) == NULL) return;
    for (int up = 0; up < 2; up++) {   /* strip the file, then the folder holding it */
        char *slash = strrchr(root, '/');
        if (slash == NULL) return;
        *slash = '\0';
    }
    char lua_dir[PATH_MAX + 8];
    struct stat st;
    snprintf(lua_dir, sizeof lua_dir, "%s/lua", root);
    if (stat(lua_dir, &st) != 0 || !S_ISDIR(st.st_mode)) return;

    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", lua_dir, lua_dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

static void open_libraries(lua_State *L) {
    luaL_openlibs(L);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_cjson);
    lua_setfield(L, -2, "cjson");
    lua_pop(L, 1);
    dsrt_openlibs(L);
    search_checkout_lua_first(L);
}

/*
 * The REPL. Reading a line gives one of three outcomes; an interrupted line (Ctrl-C at the
 * prompt) throws away the statement being typed, as shells do.
 */
enum line_outcome { LINE_READ, LINE_END_OF_INPUT, LINE_INTERRUPTED };

static volatile sig_atomic_t prompt_interrupted;
static char *line_typed;
static int line_done;

static void interrupt_prompt(int sig) {
    (void)sig;
    prompt_interrupted = 1;
}

static void take_typed_line(char *line) {
    line_typed = line;
    line_done = 1;
    rl_callback_handler_remove();   /* or readline redraws the prompt after the line */
}

/* Readline's callback interface, so that Ctrl-C can end the wait for input: SIGINT stays blocked
   except inside pselect, so it either ends the wait or is seen before the next one. */
static enum line_outcome read_terminal_line(const char *prompt, char **line) {
    sigset_t sigint_only, original, unblocked;
    sigemptyset(&sigint_only);
    sigaddset(&sigint_only, SIGINT);
    sigprocmask(SIG_BLOCK, &sigint_only, &original);
    unblocked = original;
    sigdelset(&unblocked, SIGINT);
    prompt_interrupted = 0;
    set_sigint_action(interrupt_prompt);

    line_done = 0;
    line_typed = NULL;
    rl_callback_handler_install(prompt, take_typed_line);
    int input_failed = 0;
    while (!line_done && !prompt_interrupted && !input_failed) {
        fd_set readable;
        FD_ZERO(&readable);
        FD_SET(STDIN_FILENO, &readable);
        int ready = pselect(STDIN_FILENO + 1, &readable, NULL, NULL, NULL, &unblocked);
        if (ready > 0) rl_callback_read_char();
        else if (ready < 0 && errno != EINTR) input_failed = 1;
    }
    if (!line_done) {
        rl_free_line_state();
        rl_callback_sigcleanup();
        rl_replace_line("", 0);
        rl_callback_handler_remove();
        fputc('\n', stdout);
    }
    /* unblock while our handler is still in place: a Ctrl-C pending since the last pselect must
       not reach the default action, which would kill the process */
    sigprocmask(SIG_SETMASK, &original, NULL);
    set_sigint_action(SIG_DFL);

    if (line_done) {
        *line = line_typed;   /* NULL: Ctrl-D */
        return line_typed != NULL ? LINE_READ : LINE_END_OF_INPUT;
    }
    return prompt_interrupted ? LINE_INTERRUPTED : LINE_END_OF_INPUT;
}

/* Piped input: no line editing, no terminal control codes in the output, just the prompts. */
static enum line_outcome read_piped_line(const char *prompt, char **line) {
    size_t capacity = 0;
    fputs(prompt, stdout);
    fflush(stdout);
    *line = NULL;
    if (getline(line, &capacity, stdin) < 0) {
        free(*line);
        return LINE_END_OF_INPUT;
    }
    return LINE_READ;
}

struct repl {
    int on_terminal;
    char history_path[PATH_MAX];   /* empty: no history file */
};

/* Each line as typed goes to the history, so recalling it and the file hold the same entries;
   repeats of the line just before are dropped. Appending at once keeps the history of a session
   that ends in a crash or a second Ctrl-C. */
static void remember_line(struct repl *repl, const char *line) {
    if (line[0] == '\0') return;
    HIST_ENTRY *previous = history_get(history_base + history_length - 1);
    if (previous != NULL && strcmp(previous->line, line) == 0) return;
    add_history(line);
    if (repl->history_path[0] != '\0') append_history(1, repl->history_path);
}

static const char *prompt_for(lua_State *L, int first_line) {
    const char *custom = NULL;
    if (lua_getglobal(L, first_line ? "_PROMPT" : "_PROMPT2") == LUA_TSTRING)
        custom = lua_tostring(L, -1);
    lua_pop(L, 1);   /* the global keeps the string alive */
    if (custom != NULL) return custom;
    return first_line ? "> " : ">> ";
}

/* Pushes the next line, without its newline; a leading '=' on a first line means `return`. */
static enum line_outcome push_line(lua_State *L, struct repl *repl, int first_line) {
    const char *prompt = prompt_for(L, first_line);
    char *line;
    enum line_outcome outcome = repl->on_terminal ? read_terminal_line(prompt, &line)
                                                  : read_piped_line(prompt, &line);
    if (outcome != LINE_READ) return outcome;
    size_t length = strlen(line);
    if (length > 0 && line[length - 1] == '\n') line[--length] = '\0';
    if (repl->on_terminal) remember_line(repl, line);
    if (first_line && line[0] == '=') lua_pushfstring(L, "return %s", line + 1);
    else lua_pushlstring(L, line, length);
    free(line);
    return LINE_READ;
}

/* A syntax error at <eof> means the statement is not finished yet. */
static int is_incomplete(lua_State *L, int status) {
    static const char eof_mark[] = "<eof>";
    size_t length;
    if (status != LUA_ERRSYNTAX) return 0;
    const char *message = lua_tolstring(L, -1, &length);
    return length >= sizeof eof_mark - 1 &&
           strcmp(message + length - (sizeof eof_mark - 1), eof_mark) == 0;
}

/* Compiles the line on top of the stack as `return <line>;`, so an expression shows its value. */
static int load_as_expression(lua_State *L) {
    const char *expression = lua_pushfstring(L, "return %s;", lua_tostring(L, -1));
    int status = luaL_loadbuffer(L, expression, strlen(expression), "=stdin");
    if (status == LUA_OK) {
        lua_remove(L, -2);   /* the source */
        lua_remove(L, -2);   /* the line */
    } else {
        lua_pop(L, 2);   /* the error and the source */
    }
    return status;
}

enum { CHUNK_END_OF_INPUT = -1, CHUNK_DISCARDED = -2 };

/* Compiles the line on top of the stack as a statement, reading more lines while it is
   incomplete. Leaves the function or the error in place of the line. */
static int load_as_statement(lua_State *L, struct repl *repl) {
    for (;;) {
        size_t length;
        const char *source = lua_tolstring(L, -1, &length);
        int status = luaL_loadbuffer(L, source, length, "=stdin");
        if (!is_incomplete(L, status)) {
            lua_remove(L, -2);
            return status;
        }
        enum line_outcome outcome = push_line(L, repl, 0);
        if (outcome == LINE_END_OF_INPUT) {   /* report the "<eof>" error */
            lua_remove(L, -2);
            return status;
        }
        if (outcome == LINE_INTERRUPTED) {
            lua_pop(L, 2);
            return CHUNK_DISCARDED;
        }
        lua_remove(L, -2);   /* the "<eof>" error */
        lua_pushliteral(L, "\n");
        lua_insert(L, -2);
        lua_concat(L, 3);
    }
}

static int load_next_chunk(lua_State *L, struct repl *repl) {
    lua_settop(L, 0);
    enum line_outcome outcome = push_line(L, repl, 1);
    if (outcome == LINE_END_OF_INPUT) return CHUNK_END_OF_INPUT;
    if (outcome == LINE_INTERRUPTED) return CHUNK_DISCARDED;
    int status = load_as_expression(L);
    if (status != LUA_OK) status = load_as_statement(L, repl);
    return status;
}

/* Shows a chunk's results through the global print, so __tostring (a tensor's summary) and a
   user's own print both apply; a statement returns nothing and shows nothing. */
static void print_results(lua_State *L) {
    int n = lua_gettop(L);
    if (n == 0) return;
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    lua_getglobal(L, "print");
    lua_insert(L, 1);
    if (lua_pcall(L, n, 0, 0) != LUA_OK)
        print_message(message_prefix,
                      lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1)));
    fflush(stdout);
}

static void load_dsrt_global(lua_State *L) {
    lua_getglobal(L, "require");
    lua_pushliteral(L, "dsrt");
    if (report(L, call_chunk(L, 1, 1)) == LUA_OK) lua_setglobal(L, "dsrt");
}

static void start_history(struct repl *repl) {
    const char *home = getenv("HOME");
    repl->history_path[0] = '\0';
    stifle_history(HISTORY_KEPT);
    if (home == NULL || home[0] == '\0') return;
    int written = snprintf(repl->history_path, sizeof repl->history_path, "%s/%s", home,
                           HISTORY_FILE);
    if (written < 0 || (size_t)written >= sizeof repl->history_path) {
        repl->history_path[0] = '\0';
        return;
    }
    /* append_history needs the file to exist; a history that cannot be kept is no error */
    if (read_history(repl->history_path) == ENOENT) write_history(repl->history_path);
    history_truncate_file(repl->history_path, HISTORY_KEPT);
}

static void run_repl(lua_State *L) {
    struct repl repl = {.on_terminal = isatty(STDIN_FILENO)};
    if (repl.on_terminal) {
        rl_readline_name = PROGNAME;   /* for $if dsrt in ~/.inputrc */
        rl_catch_signals = 0;          /* Ctrl-C is ours: see read_terminal_line */
        start_history(&repl);
    }
    message_prefix = NULL;
    int status;
    while ((status = load_next_chunk(L, &repl)) != CHUNK_END_OF_INPUT) {
        if (status == CHUNK_DISCARDED) continue;
        if (status == LUA_OK) status = call_chunk(L, 0, LUA_MULTRET);
        if (status == LUA_OK) print_results(L);
        else report(L, status);
    }
    lua_settop(L, 0);
    if (!repl.on_terminal) fputc('\n', stdout);   /* readline ends the line itself at Ctrl-D */
    fflush(stdout);
    message_prefix = PROGNAME;
}

/*
 * Command line, as lua parses it: options come first and stop at the script name; -e and -l are
 * run in order after the libraries are open. Returns the options seen, or OPTIONS_BAD after
 * saying what is wrong; *script is the index of the script name (argc when there is none).
 */
enum {
    OPTION_E = 1, OPTION_I = 2, OPTION_V = 4, OPTION_NO_ENV = 8, OPTION_HELP = 16,
    OPTIONS_BAD = 32
};

static int bad_option(const char *option, const char *why) {
    fprintf(stderr, "%s: %s '%s'\n", PROGNAME, why, option);
    print_usage(stderr);
    return OPTIONS_BAD;
}

static int collect_options(char **argv, int argc, int *script) {
    int options = 0;
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        *script = i;
        if (a[0] != '-') return options;
        if (strcmp(a, "--version") == 0) { options |= OPTION_V; continue; }
        if (strcmp(a, "--help") == 0) return options | OPTION_HELP;
        switch (a[1]) {
        case '-':
            if (a[2] != '\0') return bad_option(a, "unrecognized option");
            *script = i + 1;
            return options;
        case '\0':   /* "-": the script is stdin */
            return options;
        case 'h':
            if (a[2] != '\0') return bad_option(a, "unrecognized option");
            return options | OPTION_HELP;
        case 'E':
        case 'W':
        case 'i':
        case 'v':
            if (a[2] != '\0') return bad_option(a, "unrecognized option");
            options |= a[1] == 'E' ? OPTION_NO_ENV
                     : a[1] == 'i' ? OPTION_I | OPTION_V   /* the REPL opens with the version */
                     : a[1] == 'v' ? OPTION_V : 0;
            break;
        case 'e':
        case 'l':
            if (a[1] == 'e') options |= OPTION_E;
            if (a[2] == '\0') {   /* the argument is the next word, which is not an option */
                i++;
                if (i >= argc || argv[i][0] == '-') return bad_option(a, "missing argument to");
            }
            break;
        default:
            return bad_option(a, "unrecognized option");
        }
    }
    *script = argc;
    return options;
}

/* Runs the -e, -l and -W options before the script, in the order given. */
static int run_options(lua_State *L, char **argv, int script) {
    for (int i = 1; i < script; i++) {
        char option = argv[i][1];
        if (option == 'e' || option == 'l') {
            const char *value = argv[i][2] != '\0' ? argv[i] + 2 : argv[++i];
            int status = option == 'e' ? run_string(L, value, "=(command line)")
                                       : require_into_global(L, value);
            if (status != LUA_OK) return 0;
        } else if (option == 'W') {
            lua_warning(L, "@on", 0);
        }
    }
    return 1;
}

/* Everything runs inside this protected function, so even running out of memory while setting
   up is an error message, not a crash. Returns true on success. */
static int protected_main(lua_State *L) {
    int argc = (int)lua_tointeger(L, 1);
    char **argv = lua_touserdata(L, 2);
    int script = argc;
    int options = collect_options(argv, argc, &script);
    if (options & OPTIONS_BAD) return 0;
    if (options & OPTION_HELP) {
        print_usage(stdout);
        lua_pushboolean(L, 1);
        return 1;
    }
    if (options & OPTION_V) print_version();
    if (options & OPTION_NO_ENV) {   /* read by the package library as it opens */
        lua_pushboolean(L, 1);
        lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
    }
    open_libraries(L);
    create_arg_table(L, argv, argc, script);
    if (!(options & OPTION_NO_ENV) && run_lua_init(L) != LUA_OK) return 0;
    load_dsrt_global(L);
    if (!run_options(L, argv, script)) return 0;
    if (script < argc && run_script(L, argv + script) != LUA_OK) return 0;
    if (options & OPTION_I) {
        run_repl(L);
    } else if (script == argc && !(options & (OPTION_E | OPTION_V))) {
        if (isatty(STDIN_FILENO)) {
            print_version();
            run_repl(L);
        } else if (run_file(L, NULL) != LUA_OK) {
            return 0;
        }
    }
    lua_pushboolean(L, 1);
    return 1;
}

int main(int argc, char **argv) {
    lua_State *L = luaL_newstate();
    if (L == NULL) {
        print_message(PROGNAME, "cannot create the Lua state: not enough memory");
        return EXIT_FAILURE;
    }
    lua_pushcfunction(L, protected_main);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int status = lua_pcall(L, 2, 1, 0);
    int succeeded = lua_toboolean(L, -1);
    report(L, status);
    lua_close(L);
    return status == LUA_OK && succeeded ? EXIT_SUCCESS : EXIT_FAILURE;
}
